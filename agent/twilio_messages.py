"""Twilio Media Streams messages (what Twilio sends on the stream's WebSocket) -> frozen values.

Twilio's wire format, as its documentation and its real streams have it: JSON text frames
with an ``event`` of ``connected``, ``start``, ``media``, ``mark``, ``dtmf`` or ``stop``;
numbers (``sequenceNumber``, ``chunk``, ``timestamp``) arrive as strings, and this parser
takes them as strings or numbers alike. ``media.payload`` is base64 G.711 mu-law at 8 kHz,
about 20 ms (160 bytes) per message. An event type Twilio may add later parses as
``Unknown`` (ignored by the transport, never an error), so a new Twilio feature cannot end a
call. Anything else malformed raises ``ProtocolError``.

Pure and I/O-free: the transport (``agent.transports.twilio``) decides what each one means.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import json_guard
from agent.errors import ProtocolError
from agent.events import echo

#: The one media format Twilio streams (and the only one this server decodes).
MULAW_ENCODING = "audio/x-mulaw"
MULAW_RATE = 8000
#: Track names as ``media.track`` spells them (``start.tracks`` uses the same).
TRACKS = ("inbound", "outbound")
#: A parameter name or value longer than this is not Twilio's (it caps each pair at 500).
MAX_PARAMETER_CHARS = 1024
MAX_PARAMETERS = 64


@dataclass(frozen=True)
class MediaFormat:
    encoding: str
    sample_rate: int
    channels: int

    @property
    def is_mulaw_8k_mono(self) -> bool:
        return (self.encoding, self.sample_rate, self.channels) == (MULAW_ENCODING, MULAW_RATE, 1)

    def describe(self) -> str:
        return f"{self.encoding} {self.sample_rate} Hz, {self.channels} channel(s)"


@dataclass(frozen=True)
class Connected:
    protocol: str


@dataclass(frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    #: ``inbound`` and/or ``outbound``: the tracks whose media will follow.
    tracks: tuple[str, ...]
    media_format: MediaFormat
    #: The ``<Parameter>``s of the ``<Stream>`` (a bearer token may be one of them).
    custom_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    track: str
    #: Per-track sequence number (1, 2, ...).
    chunk: int
    #: Milliseconds since the stream started, of this chunk's first sample.
    timestamp_ms: int
    #: mu-law bytes (base64 decoded).
    payload: bytes


@dataclass(frozen=True)
class Mark:
    name: str


@dataclass(frozen=True)
class Dtmf:
    track: str
    digit: str


@dataclass(frozen=True)
class Stop:
    call_sid: str


@dataclass(frozen=True)
class Unknown:
    event: str


TwilioMessage = Connected | Start | Media | Mark | Dtmf | Stop | Unknown


def parse(raw: str | bytes) -> TwilioMessage:
    """One Twilio message. Raises ``ProtocolError`` (``invalid_json``, ``invalid_value``)."""
    try:
        msg = json_guard.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not valid JSON", code="invalid_json") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message must be a JSON object", code="invalid_json")
    event = msg.get("event")
    if not isinstance(event, str):
        raise ProtocolError("missing string field 'event'", code="invalid_value")
    parser = _PARSERS.get(event)
    if parser is None:
        return Unknown(event[:64])
    return parser(msg)


def _connected(msg: dict[str, Any]) -> Connected:
    return Connected(_str(msg, "protocol", required=False))


def _start(msg: dict[str, Any]) -> Start:
    body = _object(msg, "start")
    stream_sid = _str(body, "streamSid", required=False) or _str(msg, "streamSid")
    tracks_raw = body.get("tracks", ["inbound"])
    if not isinstance(tracks_raw, list) or not tracks_raw:
        raise ProtocolError("start.tracks must be a non-empty list", code="invalid_value")
    tracks = tuple(_track(t) for t in tracks_raw)
    if len(set(tracks)) != len(tracks):
        raise ProtocolError("start.tracks names a track twice", code="invalid_value")
    fmt = _object(body, "mediaFormat")
    media_format = MediaFormat(
        _str(fmt, "encoding"), _int(fmt, "sampleRate"), _int(fmt, "channels", default=1)
    )
    return Start(
        stream_sid=stream_sid,
        call_sid=_str(body, "callSid"),
        account_sid=_str(body, "accountSid", required=False),
        tracks=tracks,
        media_format=media_format,
        custom_parameters=_parameters(body.get("customParameters")),
    )


def _media(msg: dict[str, Any]) -> Media:
    body = _object(msg, "media")
    payload_b64 = _str(body, "payload", required=True, max_chars=1 << 24)
    try:
        payload = base64.b64decode(payload_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("media.payload must be base64", code="invalid_value") from None
    return Media(
        # <Connect><Stream> media carries no track in some of Twilio's examples: inbound.
        track=_track(body.get("track", "inbound")),
        chunk=_int(body, "chunk", default=0),
        timestamp_ms=_int(body, "timestamp"),
        payload=payload,
    )


def _mark(msg: dict[str, Any]) -> Mark:
    return Mark(_str(_object(msg, "mark"), "name", required=False))


def _dtmf(msg: dict[str, Any]) -> Dtmf:
    body = _object(msg, "dtmf")
    digit = _str(body, "digit")
    if len(digit) != 1:
        raise ProtocolError("dtmf.digit must be one character", code="invalid_value")
    # Twilio names the track ``inbound_track`` here, unlike media's ``inbound``.
    track = _str(body, "track", required=False).removesuffix("_track") or "inbound"
    return Dtmf(_track(track), digit)


def _stop(msg: dict[str, Any]) -> Stop:
    body = msg.get("stop")
    call_sid = _str(body, "callSid", required=False) if isinstance(body, dict) else ""
    return Stop(call_sid)


_PARSERS: dict[str, Callable[[dict[str, Any]], TwilioMessage]] = {
    "connected": _connected,
    "start": _start,
    "media": _media,
    "mark": _mark,
    "dtmf": _dtmf,
    "stop": _stop,
}


# -- fields ------------------------------------------------------------------------------------


def _object(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"field {key!r} must be an object", code="invalid_value")
    return value


def _str(obj: dict[str, Any], key: str, required: bool = True, max_chars: int = 256) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > max_chars:
        raise ProtocolError(
            f"field {key!r} must be a string of at most {max_chars} characters",
            code="invalid_value",
        )
    return value


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    """A non-negative integer that Twilio sends as a string ("160") or a number."""
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 15:
        return int(value)
    if isinstance(value, int) and 0 <= value < 10**15:
        return value
    raise ProtocolError(
        f"field {key!r} must be a non-negative integer, got {echo(value)}", code="invalid_value"
    )


def _track(value: object) -> str:
    if value not in TRACKS:
        raise ProtocolError(f"unknown track {echo(value)}", code="invalid_value")
    assert isinstance(value, str)
    return value


def _parameters(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_PARAMETERS:
        raise ProtocolError(
            f"start.customParameters must be an object of at most {MAX_PARAMETERS} strings",
            code="invalid_value",
        )
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(value, str) or len(key) + len(value) > MAX_PARAMETER_CHARS:
            raise ProtocolError(
                "start.customParameters values must be short strings", code="invalid_value"
            )
        out[key] = value
    return out

"""The data-channel wire format: OpenAI Realtime transcription events, both directions.

Server events are typed (one ``TypedDict`` each, ``SERVER_EVENTS`` the table) and built by
small functions returning them, plain dicts ready for ``json.dumps``; each gets a unique
``event_id``. Our additions live only in extra fields (``timings``,
``language``), never as new meanings of standard ones. Client messages are parsed into
frozen dataclasses; anything malformed raises ``ProtocolError`` which the session turns
into an ``error`` event while the call goes on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import (
    Any,
    Literal,
    NotRequired,
    TypedDict,
    cast,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from agent import json_guard
from agent.audio_formats import BY_NAME, InputFormat
from agent.errors import ProtocolError

TRANSCRIPTION = "conversation.item.input_audio_transcription"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# -- server -> client: one TypedDict per event; SERVER_EVENTS is the table --------------------
#
# Each class's docstring is its line in the README's protocol summary (generated from
# SERVER_EVENTS, checked by tests/unit/test_events.py); fields that are ``NotRequired`` are
# sent only sometimes. Every event a session sends may also carry ``call_sid`` and ``track``
# (a phone call's subscribers hear several sessions at once).


class TranscriptionObject(TypedDict):
    model: str
    language: str | None
    prompt: str
    #: Extension: a streaming engine's delay (``voxtral_realtime``), settable per session.
    delay_ms: NotRequired[int]


class TurnDetectionObject(TypedDict):
    type: Literal["server_vad"]
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int


class AudioInputObject(TypedDict):
    format: dict[str, Any]
    transcription: TranscriptionObject
    turn_detection: TurnDetectionObject | None
    noise_reduction: None


class AudioObject(TypedDict):
    input: AudioInputObject


class SessionObject(TypedDict):
    """A transcription session as ``session.created``/``updated`` describe it: the GA
    fields and, beside them, the beta ones."""

    type: Literal["transcription"]
    id: str
    object: Literal["realtime.transcription_session"]
    audio: AudioObject
    include: list[str]
    input_audio_format: str
    input_audio_transcription: TranscriptionObject
    turn_detection: TurnDetectionObject | None
    include_interim: bool


class SessionCreated(TypedDict):
    """The session as it starts (sent before any other event)."""

    type: Literal["session.created"]
    event_id: str
    session: SessionObject


class SessionUpdated(TypedDict):
    """The answer to a GA ``session.update``: the session as it now is."""

    type: Literal["session.updated"]
    event_id: str
    session: SessionObject


class TranscriptionSessionUpdated(TypedDict):
    """The answer to a beta ``transcription_session.update``."""

    type: Literal["transcription_session.updated"]
    event_id: str
    session: SessionObject


class SpeechStarted(TypedDict):
    """Speech began: a new item, at its onset in the call's audio."""

    type: Literal["input_audio_buffer.speech_started"]
    event_id: str
    item_id: str
    audio_start_ms: int


class SpeechStopped(TypedDict):
    """Speech ended (after the hangover) at the end of its last speech window."""

    type: Literal["input_audio_buffer.speech_stopped"]
    event_id: str
    item_id: str
    audio_end_ms: int


class Committed(TypedDict):
    """The item's audio went to the engine; items chain by ``previous_item_id``."""

    type: Literal["input_audio_buffer.committed"]
    event_id: str
    item_id: str
    previous_item_id: str | None


class Cleared(TypedDict):
    """The answer to ``input_audio_buffer.clear``."""

    type: Literal["input_audio_buffer.cleared"]
    event_id: str


class TranscriptionDelta(TypedDict):
    """Append-only text of an open item, while the person talks."""

    type: Literal["conversation.item.input_audio_transcription.delta"]
    event_id: str
    item_id: str
    content_index: int
    delta: str


class TranscriptionInterim(TypedDict):
    """Extension, only after ``session.update`` ``{"include_interim": true}``: the whole
    current hypothesis of an open item (may change; not appended)."""

    type: Literal["conversation.item.input_audio_transcription.interim"]
    event_id: str
    item_id: str
    content_index: int
    text: str


class Timings(TypedDict):
    """Where the final's time went (ms): audio time from the end of speech to the stop
    decision (``vad_ms``) and to the start of the final decode (``decode_after_ms``); the
    engine's queue and work; from the decision to the event leaving (``server_ms``). A
    streaming engine (``voxtral_realtime``) decodes as the audio comes: its finals carry
    the model's ``delay_ms`` instead of the four decode fields."""

    speech_end_ms: float
    server_ms: float
    vad_ms: NotRequired[float]
    decode_after_ms: NotRequired[float]
    queue_ms: NotRequired[float]
    engine_ms: NotRequired[float]
    delay_ms: NotRequired[float]


class Usage(TypedDict):
    type: Literal["duration"]
    seconds: float


class TranscriptionCompleted(TypedDict):
    """The item's authoritative text (may be empty: a breath or a click the VAD took for
    speech, which our clients show as no utterance). Extras: ``timings``, ``language``,
    ``speculative`` (the final decode started at the first silence), ``lag_ms`` (the
    engine's backlog as it left: how long the oldest final still queued had waited)."""

    type: Literal["conversation.item.input_audio_transcription.completed"]
    event_id: str
    item_id: str
    content_index: int
    transcript: str
    timings: Timings
    usage: NotRequired[Usage]
    language: NotRequired[str]
    speculative: NotRequired[bool]
    lag_ms: NotRequired[float]


class ErrorObject(TypedDict):
    type: str
    code: str
    message: str
    #: The client event that caused it, when there was one.
    event_id: NotRequired[str | None]


class TranscriptionFailed(TypedDict):
    """The item could not be transcribed (``engine_timeout``, ``queue_full``...)."""

    type: Literal["conversation.item.input_audio_transcription.failed"]
    event_id: str
    item_id: str
    content_index: int
    error: ErrorObject


class Error(TypedDict):
    """A client's mistake (the session goes on), or ``session_expired`` just before the
    server hangs up at ``limits.max_call_s``."""

    type: Literal["error"]
    event_id: str
    error: ErrorObject


class EngineLag(TypedDict):
    """Extension: this item's final is still unanswered 1 s after its commit while the
    engine's backlog is as long: the transcript will be late (at most one per item)."""

    type: Literal["voxtral.engine_lag"]
    event_id: str
    item_id: str
    lag_ms: float
    queue_depth: int


class Dtmf(TypedDict):
    """Extension, phone calls only: a key pressed on the phone."""

    type: Literal["voxtral.dtmf"]
    event_id: str
    digit: str
    track: str
    call_sid: str


ServerEvent = (
    SessionCreated
    | SessionUpdated
    | TranscriptionSessionUpdated
    | SpeechStarted
    | SpeechStopped
    | Committed
    | Cleared
    | TranscriptionDelta
    | TranscriptionInterim
    | TranscriptionCompleted
    | TranscriptionFailed
    | Error
    | EngineLag
    | Dtmf
)
#: Kept for the code that names the union of what a session sends.
Event = ServerEvent

#: The table: every server event's ``type`` and its shape, in the README's order.
SERVER_EVENTS: dict[str, type[Any]] = {
    get_args(get_type_hints(cls)["type"])[0]: cls
    for cls in (
        SessionCreated,
        SessionUpdated,
        TranscriptionSessionUpdated,
        SpeechStarted,
        SpeechStopped,
        Committed,
        Cleared,
        TranscriptionDelta,
        TranscriptionInterim,
        TranscriptionCompleted,
        TranscriptionFailed,
        Error,
        EngineLag,
        Dtmf,
    )
}


def session_created(session: SessionObject) -> SessionCreated:
    return {"type": "session.created", "event_id": new_id("event"), "session": session}


def session_updated(session: SessionObject) -> SessionUpdated:
    return {"type": "session.updated", "event_id": new_id("event"), "session": session}


def transcription_session_updated(session: SessionObject) -> TranscriptionSessionUpdated:
    """The beta answer to ``transcription_session.update``."""
    return {
        "type": "transcription_session.updated",
        "event_id": new_id("event"),
        "session": session,
    }


def speech_started(item_id: str, audio_start_ms: int) -> SpeechStarted:
    return {
        "type": "input_audio_buffer.speech_started",
        "event_id": new_id("event"),
        "item_id": item_id,
        "audio_start_ms": audio_start_ms,
    }


def speech_stopped(item_id: str, audio_end_ms: int) -> SpeechStopped:
    return {
        "type": "input_audio_buffer.speech_stopped",
        "event_id": new_id("event"),
        "item_id": item_id,
        "audio_end_ms": audio_end_ms,
    }


def committed(item_id: str, previous_item_id: str | None) -> Committed:
    return {
        "type": "input_audio_buffer.committed",
        "event_id": new_id("event"),
        "item_id": item_id,
        "previous_item_id": previous_item_id,
    }


def cleared() -> Cleared:
    return {"type": "input_audio_buffer.cleared", "event_id": new_id("event")}


def transcription_delta(item_id: str, delta: str) -> TranscriptionDelta:
    return {
        "type": "conversation.item.input_audio_transcription.delta",
        "event_id": new_id("event"),
        "item_id": item_id,
        "content_index": 0,
        "delta": delta,
    }


def transcription_interim(item_id: str, text: str) -> TranscriptionInterim:
    """Extension: the whole current hypothesis of an open item (may change; not appended)."""
    return {
        "type": "conversation.item.input_audio_transcription.interim",
        "event_id": new_id("event"),
        "item_id": item_id,
        "content_index": 0,
        "text": text,
    }


def transcription_completed(
    item_id: str,
    transcript: str,
    timings: Timings,
    language: str | None = None,
    speculative: bool = False,
    audio_s: float | None = None,
) -> TranscriptionCompleted:
    rounded = cast(Timings, {k: round(cast(float, v), 1) for k, v in timings.items()})
    event: TranscriptionCompleted = {
        "type": "conversation.item.input_audio_transcription.completed",
        "event_id": new_id("event"),
        "item_id": item_id,
        "content_index": 0,
        "transcript": transcript,
        "timings": rounded,
    }
    if audio_s is not None:
        # As OpenAI bills whisper-style models: the seconds of audio transcribed.
        event["usage"] = {"type": "duration", "seconds": round(audio_s, 3)}
    if language:
        event["language"] = language
    if speculative:
        # Extension: the final decode started at the first silence, before the hangover.
        event["speculative"] = True
    return event


def transcription_failed(item_id: str, code: str, message: str) -> TranscriptionFailed:
    return {
        "type": "conversation.item.input_audio_transcription.failed",
        "event_id": new_id("event"),
        "item_id": item_id,
        "content_index": 0,
        "error": {"type": "transcription_error", "code": code, "message": message},
    }


def engine_lag(item_id: str, lag_ms: float, queue_depth: int) -> EngineLag:
    """Extension event: the engine is behind real time; this item's final will be late."""
    return {
        "type": "voxtral.engine_lag",
        "event_id": new_id("event"),
        "item_id": item_id,
        "lag_ms": round(lag_ms, 1),
        "queue_depth": queue_depth,
    }


def dtmf(digit: str, track: str, call_sid: str) -> Dtmf:
    return {
        "type": "voxtral.dtmf",
        "event_id": new_id("event"),
        "digit": digit,
        "track": track,
        "call_sid": call_sid,
    }


#: Longest piece of a client's own input repeated back in an ``error`` event.
ECHO_MAX_CHARS = 64
#: Longest ``error.message``: ours are one sentence; the cap guards against a long echo.
ERROR_MESSAGE_MAX_CHARS = 256


def clip(text: str, max_chars: int = ECHO_MAX_CHARS) -> str:
    """``text`` cut to ``max_chars`` characters, an ellipsis marking the cut."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def echo(value: object) -> str:
    """A client's value quoted for an error message, cut to ``ECHO_MAX_CHARS``.

    Errors repeat what the client sent so it can tell which input was refused; repeating all
    of it would let every small bad message cost its full size again on the way back.
    """
    return clip(repr(value))


def error(
    code: str, message: str, type_: str = "invalid_request_error", **extra: str | None
) -> Error:
    """``extra`` may only be the ``event_id`` of the client event that caused it."""
    body: ErrorObject = {
        "type": type_,
        "code": code,
        "message": clip(message, ERROR_MESSAGE_MAX_CHARS),
    }
    for key, value in extra.items():
        if key != "event_id":
            raise TypeError(f"error() got an unexpected field {key!r}")
        # It comes from the client: cut like any other echo.
        body["event_id"] = clip(value) if isinstance(value, str) else value
    return {"type": "error", "event_id": new_id("event"), "error": body}


# -- client -> server ---------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDetection:
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    #: Sent as the beta ``transcription_session.update`` (answered in kind).
    beta: bool = False
    #: ``audio.input.format`` / ``input_audio_format``; ``None`` = unchanged.
    input_format: InputFormat | None = None
    #: The transcription model the client named (the engine answers whatever it is).
    model: str | None = None
    #: ``None`` = not mentioned; ``""`` = back to the default / detection.
    language: str | None = None
    prompt: str | None = None
    #: True when the message set ``turn_detection: null`` (client-driven commits).
    turn_detection_off: bool = False
    turn_detection: TurnDetection | None = None
    #: Extension: send ``...input_audio_transcription.interim`` events; ``None`` = unchanged.
    include_interim: bool | None = None
    #: Extension (streaming engines): ``transcription.delay_ms``; ``None`` = unchanged.
    delay_ms: int | None = None


@dataclass(frozen=True)
class Commit:
    event_id: str | None


@dataclass(frozen=True)
class Clear:
    event_id: str | None


@dataclass(frozen=True)
class Append:
    """``input_audio_buffer.append``: base64 audio in the session's input format."""

    event_id: str | None
    audio: str


ClientEvent = SessionUpdate | Commit | Clear | Append

#: The client events the server reads, by ``type``, and what each is parsed into.
CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdate,
    "transcription_session.update": SessionUpdate,
    "input_audio_buffer.append": Append,
    "input_audio_buffer.commit": Commit,
    "input_audio_buffer.clear": Clear,
}

#: Transcription models whose OpenAI sessions have no server VAD unless asked: a client
#: naming one without a ``turn_detection`` commits each turn itself (LiveKit's plugin does,
#: and would get ``input_audio_buffer_commit_empty`` after our VAD had cut the turn).
CLIENT_TURN_MODELS = ("gpt-realtime-whisper", "gpt-live-transcribe")

#: ``semantic_vad`` eagerness -> the silence that ends a turn on our VAD (ms). OpenAI's
#: semantic detector waits longer when unsure; ours waits a fixed time, so "low" (let the
#: speaker finish) waits longest and "high" (answer quickly) shortest.
SEMANTIC_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 350}

MAX_CLIENT_MESSAGE = 65_536


def parse_client_event(raw: str | bytes, max_bytes: int = MAX_CLIENT_MESSAGE) -> ClientEvent:
    """Parse one client message. Raises ``ProtocolError`` with an OpenAI-style code."""
    if len(raw) > max_bytes:
        raise ProtocolError(f"message larger than {max_bytes} bytes", code="message_too_large")
    try:
        # Depth-guarded: deep nesting made json.loads raise RecursionError, which escaped
        # the channel's message handler and killed the call's DTLS loop.
        msg = json_guard.loads(raw)
    except json_guard.JsonTooDeep as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not valid JSON", code="invalid_json") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message must be a JSON object", code="invalid_json")
    type_ = msg.get("type")
    event_id = msg.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("event_id must be a string", code="invalid_value")
    if type_ == "input_audio_buffer.append":
        audio = msg.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("append needs a base64 string 'audio'", code="invalid_value")
        return Append(event_id, audio)
    if type_ == "input_audio_buffer.commit":
        return Commit(event_id)
    if type_ == "input_audio_buffer.clear":
        return Clear(event_id)
    if type_ in ("session.update", "transcription_session.update"):
        return _parse_session_update(msg, event_id, beta=type_ != "session.update")
    if not isinstance(type_, str):
        raise ProtocolError("missing string field 'type'", code="missing_required_parameter")
    raise ProtocolError(f"unsupported event type {echo(type_)}", code="unknown_event_type")


def _parse_session_update(msg: dict[str, Any], event_id: str | None, beta: bool) -> SessionUpdate:
    """Both shapes: GA (``session.audio.input.{format, transcription, turn_detection}``) and
    beta (``session.input_audio_format``, ``input_audio_transcription``, ``turn_detection``).
    Fields we do not use (``noise_reduction``, ``include``, ``type``...) are ignored."""
    session = msg.get("session")
    if not isinstance(session, dict):
        raise ProtocolError("session.update needs an object 'session'", code="invalid_value")
    audio = session.get("audio")
    audio_input = audio.get("input") if isinstance(audio, dict) else None
    if not isinstance(audio_input, dict):
        audio_input = {}
    input_format = _parse_format(session.get("input_audio_format", audio_input.get("format")))
    transcription = session.get("input_audio_transcription", audio_input.get("transcription"))
    language = prompt = model = None
    delay_ms: int | None = None
    if transcription is not None:
        if not isinstance(transcription, dict):
            raise ProtocolError("input_audio_transcription must be an object", "invalid_value")
        language = _opt_str(transcription, "language", max_len=16)
        prompt = _opt_str(transcription, "prompt", max_len=2000)
        model = _opt_str(transcription, "model", max_len=128)
        delay_ms = _opt_int(transcription, "delay_ms", 0, 100_000)
        if language and not language.replace("-", "").isalpha():
            raise ProtocolError(
                f"language {echo(language)} is not a language code", "invalid_value"
            )
    include_interim = session.get("include_interim")
    if include_interim is not None and not isinstance(include_interim, bool):
        raise ProtocolError("include_interim must be true or false", "invalid_value")
    key_present = "turn_detection" in session or "turn_detection" in audio_input
    td_raw = session.get("turn_detection", audio_input.get("turn_detection"))
    turn = None
    if td_raw is not None:
        if not isinstance(td_raw, dict):
            raise ProtocolError("turn_detection must be an object or null", "invalid_value")
        turn = _parse_turn_detection(td_raw)
    return SessionUpdate(
        event_id,
        beta=beta,
        input_format=input_format,
        model=model,
        language=language,
        prompt=prompt,
        turn_detection_off=key_present and td_raw is None,
        turn_detection=turn,
        include_interim=include_interim,
        delay_ms=delay_ms,
    )


def _parse_format(raw: Any) -> InputFormat | None:
    if raw is None:
        return None
    name = raw.get("type") if isinstance(raw, dict) else raw
    fmt = BY_NAME.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ProtocolError(
            f"audio format {echo(name)} is not supported (audio/pcm at 24000 Hz, audio/pcmu, "
            "audio/pcma; beta: pcm16, g711_ulaw, g711_alaw)",
            "invalid_value",
        )
    rate = raw.get("rate") if isinstance(raw, dict) else None
    if rate is not None and rate != fmt.rate:
        raise ProtocolError(f"{name} is only accepted at {fmt.rate} Hz", "invalid_value")
    return fmt


def _parse_turn_detection(td_raw: dict[str, Any]) -> TurnDetection:
    kind = td_raw.get("type", "server_vad")
    if kind == "semantic_vad":
        eagerness = td_raw.get("eagerness", "auto")
        if eagerness not in SEMANTIC_SILENCE_MS:
            raise ProtocolError(f"eagerness {echo(eagerness)} is not supported", "invalid_value")
        return TurnDetection(silence_duration_ms=SEMANTIC_SILENCE_MS[eagerness])
    if kind != "server_vad":
        raise ProtocolError(f"turn_detection type {echo(kind)} is not supported", "invalid_value")
    return TurnDetection(
        threshold=_opt_number(td_raw, "threshold", 0.01, 0.99),
        prefix_padding_ms=_opt_int(td_raw, "prefix_padding_ms", 0, 5000),
        silence_duration_ms=_opt_int(td_raw, "silence_duration_ms", 32, 10_000),
    )


def _opt_str(obj: dict[str, Any], key: str, max_len: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{key} must be a string of at most {max_len} chars", "invalid_value")
    return value


def _opt_number(obj: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ProtocolError(f"{key} must be a number in [{lo}, {hi}]", "invalid_value")
    return float(value)


def _opt_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{key} must be an integer in [{lo}, {hi}]", "invalid_value")
    return value


# -- the protocol summary, from the table -----------------------------------------------------


def optional_keys(cls: type[Any]) -> frozenset[str]:
    """A TypedDict's keys that may be missing. (``__optional_keys__`` cannot see
    ``NotRequired`` under ``from __future__ import annotations``.)"""
    hints = get_type_hints(cls, include_extras=True)
    if not getattr(cls, "__total__", True):
        return frozenset(hints)
    return frozenset(k for k, h in hints.items() if get_origin(h) is NotRequired)


def _fields(cls: type[Any]) -> str:
    hints = get_type_hints(cls)
    optional = optional_keys(cls)
    parts = []
    for name, hint in hints.items():
        if name in ("type", "event_id"):
            continue
        inner = [a for a in (hint, *get_args(hint)) if is_typeddict(a)]
        if inner:
            maybe = optional_keys(inner[0])
            sub = ", ".join(k + "?" * (k in maybe) for k in get_type_hints(inner[0]))
            shown = f"{name}: {{{sub}}}"
        else:
            shown = name
        parts.append(f"`{shown}`" + ("?" if name in optional else ""))
    return ", ".join(parts)


def protocol_table() -> str:
    """The README's table of server events: every event of ``SERVER_EVENTS``, its fields
    (``?``: only sometimes) and what it means (its class's docstring)."""
    rows = ["| event | fields | meaning |", "|---|---|---|"]
    for type_, cls in SERVER_EVENTS.items():
        doc = " ".join((cls.__doc__ or "").split())
        rows.append(f"| `{type_}` | {_fields(cls)} | {doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(protocol_table(), end="")

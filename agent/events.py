"""The data-channel wire format: OpenAI Realtime transcription events, both directions.

Server events are built by small functions returning plain dicts ready for ``json.dumps``;
each gets a unique ``event_id``. Our additions live only in extra fields (``timings``,
``language``), never as new meanings of standard ones. Client messages are parsed into
frozen dataclasses; anything malformed raises ``ProtocolError`` which the session turns
into an ``error`` event while the call goes on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from agent import json_guard
from agent.audio_formats import BY_NAME, InputFormat
from agent.errors import ProtocolError

Event = dict[str, Any]

TRANSCRIPTION = "conversation.item.input_audio_transcription"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _event(type_: str, **fields: Any) -> Event:
    return {"type": type_, "event_id": new_id("event"), **fields}


def session_created(session: dict[str, Any]) -> Event:
    return _event("session.created", session=session)


def session_updated(session: dict[str, Any]) -> Event:
    return _event("session.updated", session=session)


def transcription_session_updated(session: dict[str, Any]) -> Event:
    """The beta answer to ``transcription_session.update``."""
    return _event("transcription_session.updated", session=session)


def speech_started(item_id: str, audio_start_ms: int) -> Event:
    return _event(
        "input_audio_buffer.speech_started", item_id=item_id, audio_start_ms=audio_start_ms
    )


def speech_stopped(item_id: str, audio_end_ms: int) -> Event:
    return _event("input_audio_buffer.speech_stopped", item_id=item_id, audio_end_ms=audio_end_ms)


def committed(item_id: str, previous_item_id: str | None) -> Event:
    return _event(
        "input_audio_buffer.committed", item_id=item_id, previous_item_id=previous_item_id
    )


def cleared() -> Event:
    return _event("input_audio_buffer.cleared")


def transcription_delta(item_id: str, delta: str) -> Event:
    return _event(f"{TRANSCRIPTION}.delta", item_id=item_id, content_index=0, delta=delta)


def transcription_interim(item_id: str, text: str) -> Event:
    """Extension: the whole current hypothesis of an open item (may change; not appended)."""
    return _event(f"{TRANSCRIPTION}.interim", item_id=item_id, content_index=0, text=text)


def transcription_completed(
    item_id: str,
    transcript: str,
    timings: dict[str, float],
    language: str | None = None,
    speculative: bool = False,
    audio_s: float | None = None,
) -> Event:
    event = _event(
        f"{TRANSCRIPTION}.completed",
        item_id=item_id,
        content_index=0,
        transcript=transcript,
        timings={k: round(v, 1) for k, v in timings.items()},
    )
    if audio_s is not None:
        # As OpenAI bills whisper-style models: the seconds of audio transcribed.
        event["usage"] = {"type": "duration", "seconds": round(audio_s, 3)}
    if language:
        event["language"] = language
    if speculative:
        # Extension: the final decode started at the first silence, before the hangover.
        event["speculative"] = True
    return event


def transcription_failed(item_id: str, code: str, message: str) -> Event:
    return _event(
        f"{TRANSCRIPTION}.failed",
        item_id=item_id,
        content_index=0,
        error={"type": "transcription_error", "code": code, "message": message},
    )


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


def error(code: str, message: str, type_: str = "invalid_request_error", **extra: Any) -> Event:
    message = clip(message, ERROR_MESSAGE_MAX_CHARS)
    body: dict[str, Any] = {"type": type_, "code": code, "message": message}
    # Extras (``event_id``) come from the client: cut like any other echo.
    body.update({k: clip(v) if isinstance(v, str) else v for k, v in extra.items()})
    return _event("error", error=body)


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

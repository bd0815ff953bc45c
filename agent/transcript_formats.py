"""Render a ``FileTranscript`` in OpenAI's response formats: json, text, verbose_json, srt, vtt.

Pure functions, shared by the HTTP endpoint and the CLI so both print byte-identical output.
The JSON shapes are OpenAI's (``Transcription`` / ``TranscriptionVerbose`` of the ``openai``
SDK). Fields the engines cannot measure keep the SDK's types with neutral values:
``tokens`` is empty and ``avg_logprob`` is 0; ``no_speech_prob`` comes from the VAD and
``compression_ratio`` is the segment text's real zlib ratio (Whisper's hallucination check).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Literal, get_args

from agent.file_transcriber import FileTranscript, Segment

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]
RESPONSE_FORMATS: tuple[str, ...] = get_args(ResponseFormat)
#: Formats that show segment times: their pieces are one speech region each.
TIMED_FORMATS = frozenset({"verbose_json", "srt", "vtt"})


@dataclass(frozen=True)
class Rendered:
    body: str
    content_type: str


def needs_timestamps(fmt: ResponseFormat) -> bool:
    return fmt in TIMED_FORMATS


def render(transcript: FileTranscript, fmt: ResponseFormat, temperature: float = 0.0) -> Rendered:
    """The response body for ``fmt``."""
    if fmt == "json":
        return Rendered(json.dumps(to_json(transcript)), "application/json")
    if fmt == "verbose_json":
        return Rendered(json.dumps(to_verbose_json(transcript, temperature)), "application/json")
    if fmt == "srt":
        return Rendered(to_srt(transcript), "text/plain")
    if fmt == "vtt":
        return Rendered(to_vtt(transcript), "text/vtt")
    return Rendered(transcript.text + "\n", "text/plain")


def usage(transcript: FileTranscript) -> dict[str, Any]:
    """OpenAI's duration-billed usage object."""
    return {"type": "duration", "seconds": round(transcript.duration_s, 3)}


def to_json(transcript: FileTranscript) -> dict[str, Any]:
    return {"text": transcript.text, "usage": usage(transcript)}


def to_verbose_json(transcript: FileTranscript, temperature: float = 0.0) -> dict[str, Any]:
    return {
        "task": "transcribe",
        "language": transcript.language or "",
        "duration": round(transcript.duration_s, 3),
        "text": transcript.text,
        "segments": [_segment_json(s, temperature) for s in transcript.segments],
        "usage": usage(transcript),
    }


def _segment_json(segment: Segment, temperature: float) -> dict[str, Any]:
    return {
        "id": segment.id,
        "seek": int(segment.start * 100),  # Whisper's unit: 10 ms mel frames
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "tokens": [],
        "temperature": temperature,
        "avg_logprob": 0.0,
        "compression_ratio": round(compression_ratio(segment.text), 3),
        "no_speech_prob": segment.no_speech_prob,
    }


def compression_ratio(text: str) -> float:
    """UTF-8 length over zlib length: high for looping, repeated text."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def to_srt(transcript: FileTranscript) -> str:
    cues = [
        f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_cue_text(s.text)}\n"
        for n, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(transcript: FileTranscript) -> str:
    cues = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_cue_text(s.text)}\n"
        for s in transcript.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def _cue_text(text: str) -> str:
    """One line, and never the cue separator: a blank line or ``-->`` would end the cue."""
    return " ".join(text.split()).replace("-->", "->")


def _clock(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SubRip) or ``HH:MM:SS.mmm`` (WebVTT)."""
    total_ms = max(round(seconds * 1000), 0)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"

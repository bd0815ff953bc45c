"""Response formats: OpenAI's JSON shapes, SubRip and WebVTT cues with exact clocks."""

from __future__ import annotations

import json

from agent.file_transcriber import FileTranscript, Segment, stitch
from agent.transcript_formats import render

SEGMENTS = [
    Segment(0, 0.32, 1.184, "Ever tried.", "en", 0.05),
    Segment(1, 3725.5, 3727.0, "Fail\n\nbetter --> now", "en", 0.1),
]


def transcript() -> FileTranscript:
    return stitch(SEGMENTS, duration_s=3730.0)


def test_stitch_joins_texts_and_takes_the_detected_language() -> None:
    t = transcript()
    assert t.text == "Ever tried. Fail\n\nbetter --> now"
    assert t.language == "en" and t.duration_s == 3730.0
    assert stitch([], 1.5, "fr") == FileTranscript("", (), 1.5, "fr")


def test_json_and_text() -> None:
    body = json.loads(render(transcript(), "json").body)
    assert body == {"text": transcript().text, "usage": {"type": "duration", "seconds": 3730.0}}
    text = render(transcript(), "text")
    assert text.body == transcript().text + "\n" and text.content_type == "text/plain"


def test_verbose_json_has_the_openai_segment_fields() -> None:
    body = json.loads(render(transcript(), "verbose_json", temperature=0.2).body)
    assert body["task"] == "transcribe" and body["language"] == "en"
    assert body["duration"] == 3730.0
    first = body["segments"][0]
    assert set(first) == {
        "id", "seek", "start", "end", "text", "tokens", "temperature",
        "avg_logprob", "compression_ratio", "no_speech_prob",
    }  # fmt: skip
    assert (first["start"], first["end"], first["seek"]) == (0.32, 1.184, 32)
    assert first["temperature"] == 0.2 and first["no_speech_prob"] == 0.05


def test_srt() -> None:
    assert render(transcript(), "srt").body == (
        "1\n00:00:00,320 --> 00:00:01,184\nEver tried.\n\n"
        "2\n01:02:05,500 --> 01:02:07,000\nFail better -> now\n"
    )


def test_vtt() -> None:
    rendered = render(transcript(), "vtt")
    assert rendered.content_type == "text/vtt"
    assert rendered.body == (
        "WEBVTT\n\n"
        "00:00:00.320 --> 00:00:01.184\nEver tried.\n\n"
        "01:02:05.500 --> 01:02:07.000\nFail better -> now\n"
    )

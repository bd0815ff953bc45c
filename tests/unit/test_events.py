"""Wire format: server event shapes (OpenAI Realtime) and client message parsing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent import events, json_guard
from agent.errors import ProtocolError
from tests.support.wire import problems


def roundtrip(event: dict) -> dict:
    return json.loads(json.dumps(event))


def test_every_event_has_type_and_unique_event_id() -> None:
    made = [
        events.session_created({"id": "s"}),
        events.speech_started("item_1", 350),
        events.speech_stopped("item_1", 1220),
        events.committed("item_1", None),
        events.transcription_delta("item_1", "Ever"),
        events.transcription_completed("item_1", "Ever tried.", {"engine_ms": 1.23}),
        events.transcription_failed("item_1", "engine_error", "boom"),
        events.error("invalid_json", "bad"),
    ]
    ids = [e["event_id"] for e in made]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(e["type"], str) and e["event_id"].startswith("event_") for e in made)


def test_shapes_match_openai_realtime() -> None:
    e = roundtrip(events.speech_started("item_1", 350))
    assert set(e) == {"type", "event_id", "item_id", "audio_start_ms"}
    assert e["type"] == "input_audio_buffer.speech_started" and e["audio_start_ms"] == 350
    e = roundtrip(events.speech_stopped("item_1", 1220))
    assert set(e) == {"type", "event_id", "item_id", "audio_end_ms"}
    assert e["type"] == "input_audio_buffer.speech_stopped" and e["audio_end_ms"] == 1220
    e = roundtrip(events.committed("item_2", "item_1"))
    assert e["type"] == "input_audio_buffer.committed"
    assert (e["item_id"], e["previous_item_id"]) == ("item_2", "item_1")
    e = roundtrip(events.transcription_delta("item_1", "Ever"))
    assert e["type"] == "conversation.item.input_audio_transcription.delta"
    assert (e["content_index"], e["delta"]) == (0, "Ever")
    e = roundtrip(
        events.transcription_completed(
            "item_1",
            "Ever tried.",
            {"speech_end_ms": 1, "vad_ms": 2.04, "engine_ms": 3.06},
            language="en",
        )
    )
    assert e["type"] == "conversation.item.input_audio_transcription.completed"
    assert e["transcript"] == "Ever tried." and e["content_index"] == 0
    assert e["timings"] == {"speech_end_ms": 1, "vad_ms": 2.0, "engine_ms": 3.1}
    assert e["language"] == "en"
    e = roundtrip(events.transcription_failed("item_1", "engine_error", "boom"))
    assert e["type"] == "conversation.item.input_audio_transcription.failed"
    assert e["error"] == {"type": "transcription_error", "code": "engine_error", "message": "boom"}
    e = roundtrip(events.error("invalid_json", "bad"))
    assert e["type"] == "error"
    assert e["error"] == {"type": "invalid_request_error", "code": "invalid_json", "message": "bad"}


def test_parse_commit_clear_update() -> None:
    assert isinstance(
        events.parse_client_event('{"type": "input_audio_buffer.commit"}'), events.Commit
    )
    assert isinstance(
        events.parse_client_event('{"type": "input_audio_buffer.clear", "event_id": "e1"}'),
        events.Clear,
    )
    upd = events.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "input_audio_transcription": {"language": "fr", "prompt": "Beckett"},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.6,
                        "prefix_padding_ms": 200,
                        "silence_duration_ms": 500,
                    },
                },
            }
        )
    )
    assert isinstance(upd, events.SessionUpdate)
    assert (upd.language, upd.prompt) == ("fr", "Beckett")
    assert upd.turn_detection == events.TurnDetection(0.6, 200, 500)
    off = events.parse_client_event(
        '{"type": "session.update", "session": {"turn_detection": null}}'
    )
    assert isinstance(off, events.SessionUpdate) and off.turn_detection_off


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"no": "type"}', "missing_required_parameter"),
        ('{"type": "response.create"}', "unknown_event_type"),
        ('{"type": "session.update"}', "invalid_value"),
        (
            '{"type": "session.update", "session": {"turn_detection": {"threshold": 3}}}',
            "invalid_value",
        ),
        (
            '{"type": "session.update", "session": {"turn_detection": '
            '{"type": "semantic_vad", "eagerness": "eager"}}}',
            "invalid_value",
        ),
        (
            '{"type": "session.update", "session": {"input_audio_transcription": {"language": 5}}}',
            "invalid_value",
        ),
        ('{"type": "input_audio_buffer.commit", "event_id": 7}', "invalid_value"),
        ('{"type": "input_audio_buffer.append"}', "invalid_value"),
        ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_value"),
        ('{"type": "session.update", "session": {"input_audio_format": "opus"}}', "invalid_value"),
        (
            '{"type": "session.update", "session": {"audio": {"input": '
            '{"format": {"type": "audio/pcm", "rate": 16000}}}}}',
            "invalid_value",
        ),
        ("x" * 70_000, "message_too_large"),
    ],
)
def test_malformed_client_messages(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as err:
        events.parse_client_event(raw)
    assert err.value.code == code


# -- hostile input: deep nesting and long echoes --------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 60_000,
        ("[" * 60_000).encode(),
        '{"a": ' * 10_000,
        '{"type": "session.update", "session": ' + "[" * 65 + "]" * 65 + "}",
        ("[" * 2_000).encode("utf-16"),
    ],
)
def test_deeply_nested_messages_are_invalid_json_not_a_crash(raw: str | bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        events.parse_client_event(raw)
    assert err.value.code == "invalid_json"
    assert "nested deeper than 64" in str(err.value)


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine() -> None:
    deep_ok = "[" * 63 + "]" * 63
    raw = json.dumps({"type": "input_audio_buffer.clear", "event_id": "[{" * 500, "x": None})
    assert isinstance(events.parse_client_event(raw.replace("null", deep_ok)), events.Clear)
    escaped = r'{"type": "input_audio_buffer.commit", "event_id": "\"[[[[\\"}'
    assert events.parse_client_event(escaped) == events.Commit('"[[[[\\')


@pytest.mark.parametrize(
    ("text", "too_deep"),
    [
        ("[" * 64 + "]" * 64, False),
        ("[" * 65 + "]" * 65, True),
        ('{"a": ' * 64 + "1" + "}" * 64, False),
        ('{"a": ' * 65 + "1" + "}" * 65, True),
        ("[" + '"[",' * 500 + "1]", False),
        ('["\\\\", ' + "[" * 70 + "]" * 70 + "]", True),  # an escaped backslash ends no string
        ("[" + "[]," * 10_000 + "{}]", False),
    ],
)
def test_json_guard_measures_nesting_outside_strings(text: str, too_deep: bool) -> None:
    if too_deep:
        with pytest.raises(json_guard.JsonTooDeep):
            json_guard.loads(text)
        with pytest.raises(ValueError):  # callers that catch ValueError stay correct
            json_guard.loads(text.encode("utf-16"))
    else:
        assert json_guard.loads(text) == json.loads(text)
        assert json_guard.loads(text.encode("utf-32")) == json.loads(text)


def test_error_events_echo_a_short_prefix_of_client_input() -> None:
    long = "y" * 60_000
    with pytest.raises(ProtocolError) as err:
        events.parse_client_event(json.dumps({"type": long}))
    message = str(err.value)
    assert message.startswith("unsupported event type 'yyy") and message.endswith("…")
    assert len(message) <= len("unsupported event type ") + events.ECHO_MAX_CHARS
    session = {"turn_detection": {"type": {"k": long}}}
    with pytest.raises(ProtocolError) as err:
        events.parse_client_event(json.dumps({"type": "session.update", "session": session}))
    assert len(str(err.value)) < 2 * events.ECHO_MAX_CHARS
    e = events.error("input_audio_buffer_commit_empty", "x" * 10_000, event_id=long)
    assert len(e["error"]["message"]) == events.ERROR_MESSAGE_MAX_CHARS
    assert e["error"]["event_id"] == "y" * (events.ECHO_MAX_CHARS - 1) + "…"
    with pytest.raises(TypeError):
        events.error("invalid_value", "fine", n="5")  # an error carries no other field
    short = events.error("invalid_value", "fine", event_id="evt_1")
    assert short["error"] == {
        "type": "invalid_request_error",
        "code": "invalid_value",
        "message": "fine",
        "event_id": "evt_1",
    }


def test_ga_and_beta_session_updates() -> None:
    from agent.audio_formats import PCM16_24K, PCMA, PCMU

    ga = events.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcmu"},
                            "transcription": {"model": "m", "language": "fr", "prompt": "p"},
                            "turn_detection": {"type": "semantic_vad", "eagerness": "high"},
                            "noise_reduction": {"type": "far_field"},
                        }
                    },
                    "include": ["item.input_audio_transcription.logprobs"],
                    "unknown": {"ignored": True},
                },
            }
        )
    )
    assert isinstance(ga, events.SessionUpdate) and not ga.beta
    assert (ga.input_format, ga.language, ga.prompt) == (PCMU, "fr", "p")
    assert ga.turn_detection == events.TurnDetection(silence_duration_ms=350)
    beta = events.parse_client_event(
        json.dumps(
            {
                "type": "transcription_session.update",
                "session": {"input_audio_format": "g711_alaw", "turn_detection": None},
            }
        )
    )
    assert isinstance(beta, events.SessionUpdate) and beta.beta
    assert beta.input_format == PCMA and beta.turn_detection_off
    pcm = events.parse_client_event(
        '{"type": "session.update", "session": {"audio": {"input": '
        '{"format": {"type": "audio/pcm", "rate": 24000}}}}}'
    )
    assert isinstance(pcm, events.SessionUpdate) and pcm.input_format == PCM16_24K
    append = events.parse_client_event('{"type": "input_audio_buffer.append", "audio": "AAA="}')
    assert append == events.Append(None, "AAA=")


def test_a_larger_limit_for_websocket_messages() -> None:
    raw = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 100_000})
    with pytest.raises(ProtocolError):
        events.parse_client_event(raw)
    assert isinstance(events.parse_client_event(raw, max_bytes=1 << 20), events.Append)


# -- the typed table, the README and what the builders make ----------------------------------


def test_the_readme_protocol_table_is_the_event_table() -> None:
    """Every server event and field the README documents exists, and every one that exists
    is documented: the section is ``protocol_table()`` (regenerate: python -m agent.events)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin = readme.index("<!-- server-events:")
    section = readme[readme.index("\n", begin) + 1 : readme.index("<!-- /server-events -->")]
    assert section == events.protocol_table()
    documented = re.findall(r"^\| `([a-z_.]+)` \|", section, re.M)
    assert documented == list(events.SERVER_EVENTS)
    assert all(cls.__doc__ for cls in events.SERVER_EVENTS.values())


def built() -> list[dict]:
    session: events.SessionObject = {
        "type": "transcription",
        "id": "sess_1",
        "object": "realtime.transcription_session",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "m", "language": None, "prompt": ""},
                "turn_detection": None,
                "noise_reduction": None,
            }
        },
        "include": [],
        "input_audio_format": "pcm16",
        "input_audio_transcription": {"model": "m", "language": "en", "prompt": ""},
        "turn_detection": {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 200,
        },
        "include_interim": False,
    }
    timings: events.Timings = {
        "speech_end_ms": 1,
        "vad_ms": 2,
        "decode_after_ms": 3,
        "queue_ms": 4,
        "engine_ms": 5,
        "server_ms": 6,
    }
    return [
        roundtrip(e)  # type: ignore[arg-type]
        for e in (
            events.session_created(session),
            events.session_updated(session),
            events.transcription_session_updated(session),
            events.speech_started("item_1", 350),
            events.speech_stopped("item_1", 1220),
            events.committed("item_1", None),
            events.cleared(),
            events.transcription_delta("item_1", "Ever"),
            events.transcription_interim("item_1", "Ever tri"),
            events.transcription_completed("item_1", "Ever tried.", timings),
            events.transcription_completed(
                "item_1", "", timings, language="en", speculative=True, audio_s=1.2
            ),
            events.transcription_failed("item_1", "engine_error", "boom"),
            events.error("invalid_json", "bad"),
            events.error("invalid_value", "bad", event_id=None),
            events.engine_lag("item_1", 1234.56, 3),
            events.dtmf("5", "inbound_track", "CA1"),
        )
    ]


def test_every_builder_makes_an_event_of_its_type() -> None:
    made = built()
    assert {e["type"] for e in made} == set(events.SERVER_EVENTS)  # every type is built
    for e in made:
        assert problems(e) == [], e


def test_the_type_check_finds_what_the_types_forbid() -> None:
    started = roundtrip(events.speech_started("item_1", 350))
    assert problems({**started, "audio_start_ms": "350"})  # a string where a number goes
    assert problems({k: v for k, v in started.items() if k != "item_id"})  # missing
    assert problems({**started, "surprise": 1})  # a field no type has
    assert problems({**started, "type": "input_audio_buffer.speech_begun"})  # no such event
    assert problems({**started, "call_sid": "CA1", "track": "inbound"}) == []  # phone calls
    done = roundtrip(events.transcription_completed("i", "x", built()[9]["timings"]))
    assert problems({**done, "timings": {**done["timings"], "vad_ms": None}})


def test_every_client_event_type_parses_to_its_class() -> None:
    messages = {
        "session.update": (events.SessionUpdate, {"session": {}}),
        "transcription_session.update": (events.SessionUpdate, {"session": {}}),
        "input_audio_buffer.append": (events.Append, {"audio": ""}),
        "input_audio_buffer.commit": (events.Commit, {}),
        "input_audio_buffer.clear": (events.Clear, {}),
    }
    assert set(messages) == set(events.CLIENT_EVENTS)
    for type_, (cls, body) in messages.items():
        parsed = events.parse_client_event(json.dumps({"type": type_, **body}))
        assert type(parsed) is cls is events.CLIENT_EVENTS[type_]

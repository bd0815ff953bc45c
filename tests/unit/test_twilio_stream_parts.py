"""The pure parts of a Twilio stream: its messages, its timestamp clock, a call's hub, the
TwiML answer, the telephony config."""

from __future__ import annotations

import base64
import json
from xml.etree import ElementTree as ET

import pytest

from agent.call_hub import COMPLETED, CallHub, Subscriber
from agent.config import ConfigError
from agent.errors import ProtocolError
from agent.event_sink import EventSink
from agent.stream_clock import MAX_GAP_FILL_MS, TrackClock
from agent.twilio_messages import Dtmf, Media, Start, Stop, Unknown, parse
from signaling.twiml import start_stream
from tests.conftest import make_config

# Twilio's documented examples (Media Streams - WebSocket Messages), numbers as strings.
START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC123",
        "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
        "callSid": "CA123",
        "tracks": ["inbound", "outbound"],
        "customParameters": {"FirstName": "Jane", "token": "t"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
}
MEDIA = {
    "event": "media",
    "sequenceNumber": "3",
    "media": {"track": "outbound", "chunk": "1", "timestamp": "5", "payload": "no+JhoaJjpzS"},
    "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
}


def test_start_as_twilio_sends_it() -> None:
    start = parse(json.dumps(START))
    assert isinstance(start, Start)
    assert (start.call_sid, start.tracks) == ("CA123", ("inbound", "outbound"))
    assert start.media_format.is_mulaw_8k_mono
    assert start.custom_parameters == {"FirstName": "Jane", "token": "t"}


def test_media_as_twilio_sends_it() -> None:
    media = parse(json.dumps(MEDIA))
    assert media == Media("outbound", 1, 5, base64.b64decode("no+JhoaJjpzS"))


def test_dtmf_stop_and_later_events() -> None:
    dtmf = {
        "event": "dtmf",
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
    assert parse(json.dumps(dtmf)) == Dtmf("inbound", "1")
    stop = {"event": "stop", "sequenceNumber": "5", "stop": {"accountSid": "AC", "callSid": "CA"}}
    assert parse(json.dumps(stop)) == Stop("CA")
    assert parse('{"event": "transcription", "x": 1}') == Unknown("transcription")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_json"),
        ("[1]", "invalid_json"),
        ("[" * 100 + "]" * 100, "invalid_json"),
        ('{"no": "event"}', "invalid_value"),
        (json.dumps({**MEDIA, "media": {**MEDIA["media"], "timestamp": "-5"}}), "invalid_value"),
        (json.dumps({**MEDIA, "media": {**MEDIA["media"], "timestamp": True}}), "invalid_value"),
        (json.dumps({**MEDIA, "media": {**MEDIA["media"], "payload": "@@"}}), "invalid_value"),
        (json.dumps({**MEDIA, "media": {**MEDIA["media"], "track": "both"}}), "invalid_value"),
        (json.dumps({**START, "start": {**START["start"], "tracks": []}}), "invalid_value"),
        (json.dumps({**START, "start": {**START["start"], "callSid": 5}}), "invalid_value"),
    ],
)
def test_malformed_messages(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse(raw)
    assert refused.value.code == code


def test_the_clock_passes_contiguous_chunks_on() -> None:
    clock = TrackClock()
    chunk = b"\x01" * 160
    assert clock.place(0, chunk) == chunk
    assert clock.place(20, chunk) == chunk
    assert clock.place(41, chunk) == chunk  # 1 ms of jitter is not a gap
    assert clock.expected_ms == 60


def test_the_clock_fills_gaps_and_drops_repeats_and_late_chunks() -> None:
    clock = TrackClock()
    chunk = b"\x01" * 160
    assert clock.place(0, chunk) == chunk
    assert clock.place(0, chunk) is None  # a repeat
    filled = clock.place(100, chunk)  # 80 ms lost
    assert filled == b"\xff" * 640 + chunk
    assert clock.place(60, chunk) is None  # late: its time has passed
    assert (clock.dropped, clock.filled_ms) == (2, 80)
    leading = TrackClock().place(40, chunk)  # audio time starts at the stream's start
    assert leading == b"\xff" * 320 + chunk


def test_the_clock_caps_a_huge_gap() -> None:
    clock = TrackClock()
    out = clock.place(10**12, b"\x01" * 160)
    assert out is not None and len(out) == MAX_GAP_FILL_MS * 8 + 160
    assert clock.place(10**12 + 20, b"\x01" * 160) == b"\x01" * 160


class ListSink(EventSink):
    def __init__(self, limit: int = 10_000, reads: bool = True) -> None:
        super().__init__(limit)
        self.sent: list[str] = []
        self.reads = reads

    def is_open(self) -> bool:
        return True

    def buffered_amount(self) -> int:
        return 0 if self.reads else sum(map(len, self.sent))

    def _write(self, text: str) -> None:
        self.sent.append(text)

    async def flush(self, timeout_s: float) -> None:
        return None


def test_the_hub_fans_out_replays_and_feeds_the_webhook() -> None:
    posted: list[str] = []
    hub = CallHub("CA1", replay_limit=2, max_subscribers=2, on_completed=posted.append)
    sink = hub.sink(1000)
    early = ListSink()
    assert hub.subscribe(Subscriber(early, stop=lambda _: None))
    sink.send('{"c": 0}', droppable=False, type_="session.created")
    for i in range(3):
        sink.send(f'{{"d": {i}}}', droppable=True, type_="x.delta")
        sink.send(f'{{"c": {i}}}', droppable=False, type_=COMPLETED)
    assert len(early.sent) == 7
    assert posted == ['{"c": 0}', '{"c": 1}', '{"c": 2}']
    late = ListSink()
    assert hub.subscribe(Subscriber(late, stop=lambda _: None))
    # The session, then the last ``replay_limit`` completed.
    assert late.sent == ['{"c": 0}', '{"c": 1}', '{"c": 2}']
    assert not hub.subscribe(Subscriber(ListSink(), stop=lambda _: None))  # max_subscribers


def test_a_subscriber_that_does_not_read_is_ended_not_the_call() -> None:
    hub = CallHub("CA1", replay_limit=4, max_subscribers=4)
    stopped: list[str] = []
    slow = ListSink(limit=1024, reads=False)
    fine = ListSink()
    hub.subscribe(Subscriber(slow, stop=stopped.append))
    hub.subscribe(Subscriber(fine, stop=lambda _: None))
    sink = hub.sink(1024)
    for _ in range(100):
        assert sink.send("x" * 100, droppable=False, type_=COMPLETED) == "sent"
    assert stopped == ["client_not_reading"]
    assert hub.subscribers == 1 and len(fine.sent) == 100
    hub.close()
    assert not sink.is_open() and hub.subscribers == 0


def test_twiml_start_stream() -> None:
    xml = start_stream("wss://h/v1/twilio/media-stream", "<Pause/>", {"token": 'a"b<c'})
    root = ET.fromstring(xml)
    stream = root.find("./Start/Stream")
    assert stream is not None and stream.get("track") == "both_tracks"
    param = stream.find("Parameter")
    assert param is not None and param.get("value") == 'a"b<c'
    assert [c.tag for c in root] == ["Start", "Pause"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TELEPHONY__PUBLIC_URL", "voice.example.com"),
        ("TELEPHONY__PUBLIC_URL", "https://voice.example.com/path"),
        ("TELEPHONY__WEBHOOK_URL", "ftp://x"),
        ("TELEPHONY__TWIML_AFTER_START", "<Dial>"),
        ("TELEPHONY__START_TIMEOUT_S", "0"),
    ],
)
def test_telephony_config_errors_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key.lower().replace("__", ".")):
        make_config(**{key: value})

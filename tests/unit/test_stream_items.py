"""Items over a streaming engine, driven by scripted detector events and frame updates.

A fake ``StreamingEngine`` stands at the seam (it records what the items push and flush);
the segmenter events are the real dataclasses. The real engine behind real sessions is in
tests/integration/test_voxtral_realtime_live.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from agent.config import EngineConfig
from agent.engines.base import (
    EngineRequest,
    EngineResult,
    EngineStream,
    Samples,
    StreamingEngine,
    StreamText,
)
from agent.engines.worker import EngineWorker
from agent.errors import EngineError
from agent.segmenter import SpeechStarted, SpeechStopped, Utterance
from agent.stream_items import StreamItems

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


class FakeStream(EngineStream):
    def __init__(self, delay_ms: int, on_update: Callable[[StreamText], None]) -> None:
        self.delay_ms = delay_ms
        self.on_update = on_update
        self.pushed = 0
        self.flushed = False
        self.closed = False

    def push(self, samples: Samples) -> None:
        self.pushed += len(samples)

    def flush(self) -> None:
        self.flushed = True

    def close(self) -> None:
        self.closed = True


class FakeStreamingEngine(StreamingEngine):
    name = "fake_streaming"

    def __init__(self, room: int = 4, lag: float = 0.0) -> None:
        self.streams: list[FakeStream] = []
        self.room = room
        self.lag = lag

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        return [EngineResult("") for _ in batch]

    def open_stream(
        self,
        on_update: Callable[[StreamText], None],
        language: str | None = None,
        delay_ms: int | None = None,
    ) -> EngineStream:
        delay = self.default_delay_ms if delay_ms is None else delay_ms
        self.check_delay(delay)
        if not self.admits():
            raise EngineError("full", "too_many_calls")
        stream = FakeStream(delay, on_update)
        self.streams.append(stream)
        return stream

    def admits(self) -> bool:
        return len([s for s in self.streams if not s.closed]) < self.room

    def lag_ms(self) -> float:
        return self.lag


def utterance(index: int, start: int, end: int) -> Utterance:
    audio = np.zeros((end - start) * 16, np.float32)
    return Utterance(index, audio, start, start, end, "silence")


def frames(items: StreamItems, start_ms: int, end_ms: int, text: str = "w", lag: float = 0) -> None:
    for t in range(start_ms, end_ms, 80):
        items.receive(StreamText(text, t, t + 80, lag_ms=lag))


@pytest.fixture
def sent() -> list[dict[str, Any]]:
    return []


async def make(
    sent: list[dict[str, Any]], engine: FakeStreamingEngine | None = None
) -> StreamItems:
    items = StreamItems(engine or FakeStreamingEngine(), sent.append, pre_roll_ms=160)
    items.open(lambda u: None)
    return items


def types(sent: list[dict[str, Any]]) -> list[str]:
    return [
        e["type"].rsplit(".", 1)[-1] if "transcription" in e["type"] else e["type"] for e in sent
    ]


async def test_frames_become_deltas_and_completed_follows_the_delay(
    sent: list[dict[str, Any]],
) -> None:
    items = await make(sent)
    frames(items, 0, 240, "x")  # silence before speech (pre-roll reaches back to 240)
    items.handle([SpeechStarted(0, 400)])
    frames(items, 240, 1120)  # the text of each frame, a delay after its audio
    items.handle([SpeechStopped(0, 1200, 1400), utterance(0, 400, 1200)])
    assert COMPLETED not in [e["type"] for e in sent]  # its last frame is not decoded yet
    frames(items, 1120, 1200)  # decoded to its end: the item is done
    frames(items, 1200, 1280)  # silence after it: no delta
    completed = [e for e in sent if e["type"] == COMPLETED]
    assert len(completed) == 1
    deltas = [e["delta"] for e in sent if e["type"] == DELTA]
    assert "".join(deltas) == completed[0]["transcript"]
    assert len(deltas) == (1200 - 240) // 80  # pre-roll frames 240..400 count, earlier do not
    assert completed[0]["timings"]["delay_ms"] == 480
    assert types(sent) == [
        "input_audio_buffer.speech_started",
        *["delta"] * (len(deltas) - 1),
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "delta",
        "completed",
    ]


async def test_items_speak_in_turn(sent: list[dict[str, Any]]) -> None:
    items = await make(sent)
    items.handle([SpeechStarted(0, 0)])
    frames(items, 0, 400, "a")
    items.handle([SpeechStopped(0, 400, 600), utterance(0, 0, 400), SpeechStarted(1, 640)])
    # The second item's text arrives before the first is complete? Not possible in audio
    # order; but its deltas are held while the first one is still open.
    frames(items, 400, 640, "")  # decoded past the first item's end: it completes
    frames(items, 640, 800, "b")
    first = [e for e in sent if e["type"] == COMPLETED]
    assert first and first[0]["transcript"] == "aaaaa"
    later = sent[sent.index(first[0]) + 1 :]
    assert [e["delta"] for e in later if e["type"] == DELTA] == ["b", "b"]


async def test_a_later_items_deltas_wait_for_the_earlier_completed(
    sent: list[dict[str, Any]],
) -> None:
    items = await make(sent)
    items.handle([SpeechStarted(0, 0), SpeechStopped(0, 400, 600), utterance(0, 0, 400)])
    frames(items, 0, 240, "a")  # item 0 decoded to 240 of its 400
    # Speech that starts again within the delay: the next item's pre-roll reaches into the
    # frames of the last one, whose end is not decoded yet; its text is held until then.
    items._last_end_ms = 0
    items.handle([SpeechStarted(1, 300)])  # pre-roll: from 140
    items.receive(StreamText("b", 240, 320))
    assert [e["type"] for e in sent].count(DELTA) == 3
    items.receive(StreamText("", 320, 400))  # item 0 decoded to its end
    kinds = [e["type"] for e in sent]
    assert kinds[-2:] == [COMPLETED, DELTA]
    assert sent[-2]["transcript"] == "aaa" and sent[-1]["delta"] == "b"


async def test_flush_at_the_end_completes_the_open_items(sent: list[dict[str, Any]]) -> None:
    engine = FakeStreamingEngine()
    items = await make(sent, engine)
    items.push(np.zeros(1600, np.float32))
    items.handle([SpeechStarted(0, 0)])
    frames(items, 0, 240, "z")
    items.handle([SpeechStopped(0, 2000, 2000), utterance(0, 0, 2000)])

    async def engine_finishes() -> None:
        await asyncio.sleep(0.01)
        assert engine.streams[0].flushed
        items.receive(StreamText("!", 240, 320, done=True))

    task = asyncio.create_task(engine_finishes())
    await items.finish(5)
    await task
    (completed,) = [e for e in sent if e["type"] == COMPLETED]
    assert completed["transcript"] == "zzz!"
    items.close()
    assert engine.streams[0].closed and engine.streams[0].pushed == 1600


async def test_engine_lag_once_per_item(sent: list[dict[str, Any]]) -> None:
    items = await make(sent)
    items.handle([SpeechStarted(0, 0)])
    frames(items, 0, 80, lag=40)  # within a frame: keeping up
    frames(items, 80, 400, lag=900)  # more than a frame waiting: behind
    lags = [e for e in sent if e["type"] == "voxtral.engine_lag"]
    assert len(lags) == 1 and lags[0]["lag_ms"] == 900


async def test_a_failed_stream_fails_the_items(sent: list[dict[str, Any]]) -> None:
    items = await make(sent)
    items.handle([SpeechStarted(0, 0), SpeechStopped(0, 400, 600), utterance(0, 0, 400)])
    items.handle([SpeechStarted(1, 800)])
    items.receive(StreamText("", 0, 0, done=True, error="engine_error"))
    assert [e["item_id"] for e in sent if e["type"] == FAILED] == [sent[0]["item_id"]]
    items.handle([SpeechStopped(1, 1200, 1400), utterance(1, 800, 1200)])
    assert len([e for e in sent if e["type"] == FAILED]) == 2


async def test_delay_only_before_the_audio(sent: list[dict[str, Any]]) -> None:
    engine = FakeStreamingEngine()
    items = await make(sent, engine)
    items.set_delay(160, lambda u: None)
    assert items.delay_ms == 160 and engine.streams[0].closed and engine.streams[1].delay_ms == 160
    with pytest.raises(EngineError):
        items.set_delay(100, lambda u: None)
    items.push(np.zeros(10, np.float32))
    with pytest.raises(EngineError):
        items.set_delay(240, lambda u: None)


async def test_the_worker_reports_the_streams_lag() -> None:
    worker = EngineWorker(FakeStreamingEngine(lag=250.0), EngineConfig())
    assert worker.lag_ms() == 250.0


async def test_client_commits_claim_the_text_decoded_before_them(
    sent: list[dict[str, Any]],
) -> None:
    """Turn detection off (Pipecat's default): no speech_started, an item exists only from
    the client's commit; it takes the text of its audio decoded so far, then the rest."""
    items = await make(sent)
    frames(items, 0, 800, "m")  # decoded before any item exists
    items.handle([utterance(0, 0, 1040)])  # commit at 1040 ms of audio
    kinds = [e["type"] for e in sent]
    assert kinds == ["input_audio_buffer.committed", DELTA]
    assert sent[1]["delta"] == "m" * 10
    frames(items, 800, 1040, "n")
    frames(items, 1040, 1200, "o")  # after its end: not its text
    (completed,) = [e for e in sent if e["type"] == COMPLETED]
    assert completed["transcript"] == "m" * 10 + "nnn"
    items.handle([utterance(1, 1040, 1600)])
    frames(items, 1200, 1600, "p")
    assert [e["transcript"] for e in sent if e["type"] == COMPLETED][1] == "oo" + "p" * 5

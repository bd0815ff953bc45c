"""Item flow with scripted detector events and a fake engine: speculation and deltas."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from agent.config import EngineConfig
from agent.detector import InterimDue
from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.engines.worker import EngineWorker
from agent.items import HOLD_S, ItemPipeline
from agent.segmenter import SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped, Utterance

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


class Scripted(Engine):
    """Answers by audio length (ms -> text), slowly; records what it decodes as it starts."""

    name = "scripted"

    def __init__(self, texts: dict[int, str], delay: float = 0.1) -> None:
        self.texts = texts
        self.delay = delay
        self.decoded: list[int] = []

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        import time

        out = []
        for r in batch:
            ms = len(r.audio) // 16
            self.decoded.append(ms)
            out.append(EngineResult(self.texts.get(ms, f"?{ms}")))
        time.sleep(self.delay)
        return out


def ms(n: int) -> np.ndarray:
    return np.zeros(n * 16, np.float32)


class Harness:
    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.sent: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.items = ItemPipeline(worker, self.sent.append, self.spawn)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        return task

    async def settle(self) -> None:
        while pending := [t for t in self.tasks if not t.done()]:
            await asyncio.wait(pending)

    def types(self) -> list[str]:
        return [e["type"].rsplit(".", 1)[-1] for e in self.sent]


@contextlib.asynccontextmanager
async def pipeline(engine: Engine, lanes: int = 1) -> AsyncIterator[Harness]:
    """An item pipeline on a started worker (one lane unless asked), closed afterwards."""
    worker = await EngineWorker.start(EngineConfig(lanes=lanes, max_wait_ms=0), engine)
    try:
        yield Harness(worker)
    finally:
        await worker.close()


async def test_speculation_dropped_when_speech_resumes_and_reused_when_it_ends() -> None:
    engine = Scripted({1000: "ever", 2000: "ever tried"}, delay=0.2)
    async with pipeline(engine) as h:
        h.items.handle([SpeechStarted(0, 300)])
        h.items.handle([SpeechPaused(0, ms(1000), 1300)])  # a pause between words ...
        await asyncio.sleep(0.05)  # ... its decode is running ...
        h.items.handle([SpeechResumed(0)])  # ... but speech goes on: dropped
        h.items.handle([SpeechPaused(0, ms(2000), 2300)])  # the real end begins
        await asyncio.sleep(0.5)  # the speculative final finishes during the hangover
        h.items.handle([SpeechStopped(0, 2268, 2492)])
        h.items.handle(
            [Utterance(0, ms(2224), audio_start_ms=0, start_ms=300, end_ms=2268, cut="silence")]
        )
        await h.settle()
        completed = [e for e in h.sent if e["type"] == COMPLETED]
        assert [c["transcript"] for c in completed] == ["ever tried"]
        assert completed[0]["speculative"] is True
        # The hangover audio (2224 ms) was never decoded: the 2000 ms decode was reused.
        assert 2224 not in engine.decoded and engine.decoded.count(2000) == 1
        assert h.items.speculations_reused == 1 and h.items.speculations_dropped == 1
        # completed came at once: the decode had finished before the stop was decided.
        assert completed[0]["timings"]["server_ms"] < 50
        # The final's decode started at the second pause, 2300 - 2268 ms after speech ended,
        # plus the hold: the withdrawn 1000 ms decode was still running then.
        assert completed[0]["timings"]["decode_after_ms"] == 32 + HOLD_S * 1000


async def test_speculation_not_used_for_forced_cut() -> None:
    engine = Scripted({1000: "partial", 3000: "whole"}, delay=0.0)
    async with pipeline(engine) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        h.items.handle([SpeechStopped(0, 3000, 3000)])
        h.items.handle(
            [Utterance(0, ms(3000), audio_start_ms=0, start_ms=0, end_ms=3000, cut="max_length")]
        )
        await h.settle()
        completed = [e for e in h.sent if e["type"] == COMPLETED]
        assert [c["transcript"] for c in completed] == ["whole"]
        assert "speculative" not in completed[0]
        assert completed[0]["timings"]["decode_after_ms"] == 0  # decided at the cut itself


async def test_deltas_append_only_then_completed() -> None:
    engine = Scripted({500: "No", 1000: "No matter", 1500: "No matter.", 1700: "No matter."})
    async with pipeline(engine) as h:
        h.items.handle([SpeechStarted(0, 0)])
        for n in (500, 1000, 1500):
            h.items.handle([InterimDue(0, ms(n))])
            await h.settle()
        h.items.handle([SpeechStopped(0, 1500, 1700)])
        h.items.handle([Utterance(0, ms(1700), 0, 0, 1500, "silence")])
        await h.settle()
        assert h.types() == [
            "speech_started",
            "delta",
            "delta",
            "speech_stopped",
            "committed",
            "completed",
        ]
        deltas = [e["delta"] for e in h.sent if e["type"] == DELTA]
        assert deltas == ["No", " matter."]


async def test_interim_events_on_request_and_no_deltas_when_off() -> None:
    engine = Scripted({500: "Fail", 1000: "Fail better"})
    async with pipeline(engine) as h:
        h.items.include_interim = True
        h.items.deltas = False
        h.items.handle([SpeechStarted(0, 0), InterimDue(0, ms(500))])
        await h.settle()
        h.items.handle([Utterance(0, ms(1000), 0, 0, 1000, "commit")])
        await h.settle()
        interims = [e for e in h.sent if e["type"].endswith(".interim")]
        assert [e["text"] for e in interims] == ["Fail"]
        assert not [e for e in h.sent if e["type"] == DELTA]


async def test_withdrawn_speculation_on_the_engine_becomes_the_interim() -> None:
    engine = Scripted({1000: "Ever tried", 1500: "Ever tried. Ever failed"}, delay=0.1)
    async with pipeline(engine) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await asyncio.sleep(0.03)  # the engine has taken the speculative decode ...
        h.items.handle([SpeechResumed(0)])  # ... when speech goes on
        await h.settle()
        assert h.items.speculations_dropped == 1
        h.items.handle([InterimDue(0, ms(1500))])
        await h.settle()
        # The 1000 ms decode was the first hypothesis: the interim after it agrees with it.
        assert [e["delta"] for e in h.sent if e["type"] == DELTA] == ["Ever tried."]
        assert engine.decoded == [1000, 1500]  # nothing decoded twice, nothing wasted


async def test_withdrawn_speculation_still_queued_is_cancelled() -> None:
    engine = Scripted({3000: "Ever tried.", 1000: "No"}, delay=0.2)
    async with pipeline(engine) as h:  # one lane: item 0's final holds it
        h.items.handle([SpeechStarted(0, 0), SpeechStopped(0, 3000, 3224)])
        h.items.handle([Utterance(0, ms(3000), 0, 0, 3000, "silence")])
        await asyncio.sleep(0.03)
        h.items.handle([SpeechStarted(1, 3500), SpeechPaused(1, ms(1000), 4500)])
        await asyncio.sleep(0.03)  # still queued behind item 0's final ...
        h.items.handle([SpeechResumed(1)])  # ... so withdrawing it saves a decode
        await h.settle()
        assert engine.decoded == [3000]
        assert h.items.speculations_dropped == 1
        # Only item 0's final sent text: the withdrawn decode never ran, so no hypothesis.
        assert [e["delta"] for e in h.sent if e["type"] == DELTA] == ["Ever tried."]


async def test_a_pause_waits_while_a_withdrawn_decode_still_runs() -> None:
    """Long speech with short gaps: a gap must not start a second decode of the whole
    utterance while the last withdrawn one still holds the engine; a real end still does."""
    engine = Scripted({1000: "Ever tried", 2000: "Ever tried. Ever failed."}, delay=0.4)
    async with pipeline(engine) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await asyncio.sleep(0.03)
        h.items.handle([SpeechResumed(0)])  # withdrawn while the engine decodes it
        h.items.handle([SpeechPaused(0, ms(1200), 1200)])  # a short gap, 60 ms ...
        await asyncio.sleep(0.06)
        h.items.handle([SpeechResumed(0)])  # ... over before the hold: never queued
        h.items.handle([SpeechPaused(0, ms(2000), 2000)])  # the real end, still held ...
        await asyncio.sleep(HOLD_S / 2)
        assert h.worker.queue_depth == 0  # ... held ...
        await asyncio.sleep(HOLD_S)
        assert h.worker.queue_depth == 1  # ... then queued (the one lane is still busy)
        h.items.handle([SpeechStopped(0, 1968, 2192)])
        h.items.handle([Utterance(0, ms(2192), 0, 0, 1968, "silence")])
        await h.settle()
        assert engine.decoded == [1000, 2000]  # the 1200 ms gap cost nothing
        (completed,) = [e for e in h.sent if e["type"] == COMPLETED]
        assert completed["transcript"] == "Ever tried. Ever failed." and completed["speculative"]
        # Its decode started the hold after the pause: 2000 + 96 - 1968 ms after the end.
        assert completed["timings"]["decode_after_ms"] == 32 + HOLD_S * 1000


async def test_no_hold_once_the_withdrawn_decode_is_done() -> None:
    engine = Scripted({1000: "Ever tried", 2000: "Ever tried. Ever failed."}, delay=0.05)
    async with pipeline(engine) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await asyncio.sleep(0.02)
        h.items.handle([SpeechResumed(0)])
        await asyncio.sleep(0.1)  # the withdrawn decode has finished
        h.items.handle([SpeechPaused(0, ms(2000), 2000)])
        await asyncio.sleep(0.02)  # well under the hold: the decode went at once
        assert engine.decoded == [1000, 2000]
        await h.settle()


class Proportional(Scripted):
    """Takes 0.3 s per second of audio, so longer audio holds a lane longer."""

    max_lanes = 2

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        self.delay = 0.3 * len(batch[0].audio) / 16_000
        return super().transcribe(batch)


async def test_no_interim_while_a_withdrawn_decode_still_runs() -> None:
    engine = Proportional({})
    async with pipeline(engine, lanes=2) as h:
        h.items.handle([SpeechStarted(0, 0), InterimDue(0, ms(500))])  # 0.15 s on a lane
        await asyncio.sleep(0.01)
        h.items.handle([SpeechPaused(0, ms(1000), 1000)])  # 0.3 s on the other lane
        await asyncio.sleep(0.02)
        h.items.handle([SpeechResumed(0)])  # withdrawn, running; the interim is in flight
        await asyncio.sleep(0.17)  # the interim is done, the withdrawn decode is not
        h.items.handle([InterimDue(0, ms(1200))])  # skipped: one hypothesis per call
        await asyncio.sleep(0.15)  # now the withdrawn decode is done too
        h.items.handle([InterimDue(0, ms(1500))])
        await h.settle()
        assert engine.decoded == [500, 1000, 1500]


class HeldFinal(Engine):
    """Answers by audio length like ``Scripted``, at once, except audio of ``hold_ms``,
    which waits for ``release`` (a final the engine is slow on)."""

    name = "held-final"
    max_lanes = 3

    def __init__(self, texts: dict[int, str], hold_ms: int) -> None:
        import threading

        self.texts = texts
        self.hold_ms = hold_ms
        self.release = threading.Event()

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        out = []
        for r in batch:
            n = len(r.audio) // 16
            if n == self.hold_ms:
                assert self.release.wait(10), "the test never released the held final"
            out.append(EngineResult(self.texts.get(n, f"?{n}")))
        return out


async def test_items_speak_in_turn() -> None:
    """The next item's deltas wait for the last item's ``completed`` (a client keeping one
    running string must never see them mixed), then go out in order; audio events do not
    wait."""
    texts = {1000: "ever tried", 400: "try again", 600: "try again fail", 800: "try again"}
    engine = HeldFinal(texts, hold_ms=1000)
    # Three lanes: the held final takes one; an interim always finds another free.
    async with pipeline(engine, lanes=3) as h:
        h.items.deltas = True
        h.items.handle([SpeechStarted(0, 0), Utterance(0, ms(1000), 0, 0, 1000, "silence")])
        h.items.handle([SpeechStarted(1, 1500)])
        for n in (400, 600):  # two hypotheses agree on "try again": a delta is due
            h.items.handle([InterimDue(1, ms(n))])
            await asyncio.sleep(0)
            while any(not t.done() for t in h.tasks if t is h.items._open[1].interim):
                await asyncio.sleep(0.01)
        first, second = h.items._turns[0].item_id, h.items._turns[1].item_id
        # Item 1 has its delta ready, but item 0 has not completed: nothing of item 1 yet.
        assert [e for e in h.sent if e.get("item_id") == second and e["type"] == DELTA] == []
        assert h.types().count("speech_started") == 2  # audio events are not held
        engine.release.set()
        h.items.handle([Utterance(1, ms(800), 1500, 1500, 2300, "silence")])
        await h.settle()
        order = [
            (e["type"].rsplit(".", 1)[-1], e["item_id"])
            for e in h.sent
            if e["type"] in (DELTA, COMPLETED)
        ]
        assert order.index(("completed", first)) < order.index(("delta", second)), order
        deltas = "".join(
            e["delta"] for e in h.sent if e["type"] == DELTA and e["item_id"] == second
        )
        assert deltas.strip() == "try again"
        assert order[-1] == ("completed", second)

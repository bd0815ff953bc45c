"""Item flow with scripted detector events, a fake engine whose decodes wait at gates the
test opens, and a hand-moved clock: speculation, holds, deltas, turns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from agent.config import EngineConfig
from agent.detector import InterimDue
from agent.engines.worker import EngineWorker
from agent.items import EAGER_HYPOTHESES, EARLIER_FINALS, HOLD_S, ItemPipeline
from agent.segmenter import SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped, Utterance
from tests.support.clock import ManualClock, until
from tests.support.engine_gate import GatedEngine, length_ms

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def scripted(texts: dict[int, str]) -> Callable[[int], str]:
    """Answers by audio length (ms -> text)."""
    return lambda ms: texts.get(ms, f"?{ms}")


def engine(texts: dict[int, str], gated: Sequence[int] = (), lanes: int = 1) -> GatedEngine:
    """Answers by audio length; decodes of the ``gated`` lengths wait for the test."""
    return GatedEngine(scripted(texts), key=length_ms, gated=gated, lanes=lanes)


def ms(n: int) -> np.ndarray:
    return np.zeros(n * 16, np.float32)


class Harness:
    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.clock = worker.clock
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

    def item(self, index: int) -> Any:
        return self.items._open[index]


async def speak(
    h: Harness, eng: GatedEngine, index: int, start_ms: int, interim_ms: int, end_ms: int
) -> None:
    """One item: an interim of its first ``interim_ms``, a pause at ``end_ms`` whose
    speculative final the engine takes, then the stop after the hangover and the cut on
    that same silence (the speculation is the final)."""
    spoken = end_ms - start_ms
    h.items.handle([SpeechStarted(index, start_ms), InterimDue(index, ms(interim_ms))])
    await h.settle()
    h.items.handle([SpeechPaused(index, ms(spoken), end_ms)])
    await eng.reached(spoken)
    h.items.handle([SpeechStopped(index, end_ms, end_ms + 224)])
    h.items.handle([Utterance(index, ms(spoken + 224), 0, start_ms, end_ms, "silence")])


@contextlib.asynccontextmanager
async def pipeline(engine: GatedEngine, lanes: int = 1) -> AsyncIterator[Harness]:
    """An item pipeline on a started worker (one lane unless asked) on a hand-moved clock,
    closed afterwards."""
    cfg = EngineConfig(lanes=lanes, max_wait_ms=0)
    worker = await EngineWorker.start(cfg, engine, ManualClock())
    try:
        yield Harness(worker)
    finally:
        await worker.close()


async def test_speculation_dropped_when_speech_resumes_and_reused_when_it_ends() -> None:
    eng = engine({1000: "ever", 2000: "ever tried"}, gated=[1000, 2000])
    async with pipeline(eng) as h:
        h.items.handle([SpeechStarted(0, 300)])
        h.items.handle([SpeechPaused(0, ms(1000), 1300)])  # a pause between words ...
        await eng.reached(1000)  # ... its decode is running ...
        h.items.handle([SpeechResumed(0)])  # ... but speech goes on: dropped
        h.items.handle([SpeechPaused(0, ms(2000), 2300)])  # the real end begins
        await h.clock.advance(HOLD_S)  # held: the withdrawn decode still runs
        eng.open(1000, 2000)
        await until(lambda: h.item(0).speculation.done(), "the speculative final")
        h.items.handle([SpeechStopped(0, 2268, 2492)])
        h.items.handle(
            [Utterance(0, ms(2224), audio_start_ms=0, start_ms=300, end_ms=2268, cut="silence")]
        )
        await h.settle()
        completed = [e for e in h.sent if e["type"] == COMPLETED]
        assert [c["transcript"] for c in completed] == ["ever tried"]
        assert completed[0]["speculative"] is True
        # The hangover audio (2224 ms) was never decoded: the 2000 ms decode was reused.
        assert eng.begun == [1000, 2000]
        assert h.items.speculations_reused == 1 and h.items.speculations_dropped == 1
        # completed came at once: the decode had finished before the stop was decided.
        assert completed[0]["timings"]["server_ms"] == 0
        # The final's decode started at the second pause, 2300 - 2268 ms after speech ended,
        # plus the hold: the withdrawn 1000 ms decode was still running then.
        assert completed[0]["timings"]["decode_after_ms"] == 32 + HOLD_S * 1000


async def test_speculation_not_used_for_forced_cut() -> None:
    eng = engine({1000: "partial", 3000: "whole"})
    async with pipeline(eng) as h:
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
    eng = engine({500: "No", 1000: "No matter", 1500: "No matter.", 1700: "No matter."})
    async with pipeline(eng) as h:
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
    eng = engine({500: "Fail", 1000: "Fail better"})
    async with pipeline(eng) as h:
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
    eng = engine({1000: "Ever tried", 1500: "Ever tried. Ever failed"}, gated=[1000])
    async with pipeline(eng) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await eng.reached(1000)  # the engine has taken the speculative decode ...
        h.items.handle([SpeechResumed(0)])  # ... when speech goes on
        eng.open(1000)
        await h.settle()
        assert h.items.speculations_dropped == 1
        h.items.handle([InterimDue(0, ms(1500))])
        await h.settle()
        # The 1000 ms decode was the first hypothesis: the interim after it agrees with it.
        assert [e["delta"] for e in h.sent if e["type"] == DELTA] == ["Ever tried."]
        assert eng.begun == [1000, 1500]  # nothing decoded twice, nothing wasted


async def test_withdrawn_speculation_still_queued_is_cancelled() -> None:
    eng = engine({3000: "Ever tried.", 1000: "No"}, gated=[3000])
    async with pipeline(eng) as h:  # one lane: item 0's final holds it
        h.items.handle([SpeechStarted(0, 0), SpeechStopped(0, 3000, 3224)])
        h.items.handle([Utterance(0, ms(3000), 0, 0, 3000, "silence")])
        await eng.reached(3000)
        h.items.handle([SpeechStarted(1, 3500), SpeechPaused(1, ms(1000), 4500)])
        await until(lambda: h.worker.queue_depth == 1)  # queued behind item 0's final ...
        h.items.handle([SpeechResumed(1)])  # ... so withdrawing it saves a decode
        eng.open(3000)
        await h.settle()
        assert eng.begun == [3000]
        assert h.items.speculations_dropped == 1
        # Only item 0's final sent text: the withdrawn decode never ran, so no hypothesis.
        assert [e["delta"] for e in h.sent if e["type"] == DELTA] == ["Ever tried."]


async def test_a_pause_waits_while_a_withdrawn_decode_still_runs() -> None:
    """Long speech with short gaps: a gap must not start a second decode of the whole
    utterance while the last withdrawn one still holds the engine; a real end still does."""
    eng = engine({1000: "Ever tried", 2000: "Ever tried. Ever failed."}, gated=[1000])
    async with pipeline(eng) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await eng.reached(1000)
        h.items.handle([SpeechResumed(0)])  # withdrawn while the engine decodes it
        h.items.handle([SpeechPaused(0, ms(1200), 1200)])  # a short gap, 60 ms ...
        await h.clock.advance(0.06)
        h.items.handle([SpeechResumed(0)])  # ... over before the hold: never queued
        h.items.handle([SpeechPaused(0, ms(2000), 2000)])  # the real end, still held ...
        await h.clock.advance(HOLD_S / 2)
        assert h.worker.queue_depth == 0  # ... held ...
        await h.clock.advance(HOLD_S / 2 + 0.001)
        await until(lambda: h.worker.queue_depth == 1, "the held decode's queueing")
        # ... then queued (the one lane is still busy)
        h.items.handle([SpeechStopped(0, 1968, 2192)])
        h.items.handle([Utterance(0, ms(2192), 0, 0, 1968, "silence")])
        eng.open(1000)
        await h.settle()
        assert eng.begun == [1000, 2000]  # the 1200 ms gap cost nothing
        (completed,) = [e for e in h.sent if e["type"] == COMPLETED]
        assert completed["transcript"] == "Ever tried. Ever failed." and completed["speculative"]
        # Its decode started the hold after the pause: 2000 + 96 - 1968 ms after the end.
        assert completed["timings"]["decode_after_ms"] == 32 + HOLD_S * 1000


async def test_no_hold_once_the_withdrawn_decode_is_done() -> None:
    eng = engine({1000: "Ever tried", 2000: "Ever tried. Ever failed."}, gated=[1000])
    async with pipeline(eng) as h:
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await eng.reached(1000)
        h.items.handle([SpeechResumed(0)])
        withdrawn = h.item(0).withdrawn
        eng.open(1000)
        await until(withdrawn.done, "the withdrawn decode")
        h.items.handle([SpeechPaused(0, ms(2000), 2000)])
        # The clock never moves: a hold would keep this decode off the engine for good.
        await eng.reached(2000)
        await h.settle()
        assert eng.begun == [1000, 2000]


async def test_no_interim_while_a_withdrawn_decode_still_runs() -> None:
    eng = engine({}, gated=[500, 1000], lanes=2)
    async with pipeline(eng, lanes=2) as h:
        h.items.handle([SpeechStarted(0, 0), InterimDue(0, ms(500))])  # on lane 1
        await eng.reached(500)
        h.items.handle([SpeechPaused(0, ms(1000), 1000)])  # a final: on lane 0
        await eng.reached(1000)
        h.items.handle([SpeechResumed(0)])  # withdrawn, running; the interim is in flight
        eng.open(500)
        await until(h.item(0).interim.done, "the interim")
        h.items.handle([InterimDue(0, ms(1200))])  # skipped: one hypothesis per call
        withdrawn = h.item(0).withdrawn
        eng.open(1000)
        await until(withdrawn.done, "the withdrawn decode")
        h.items.handle([InterimDue(0, ms(1500))])
        await h.settle()
        assert eng.begun == [500, 1000, 1500]


async def test_items_speak_in_turn() -> None:
    """The next item's deltas wait for the last item's ``completed`` (a client keeping one
    running string must never see them mixed), then go out in order; audio events do not
    wait."""
    texts = {1000: "ever tried", 400: "try again", 600: "try again fail", 800: "try again"}
    eng = engine(texts, gated=[1000], lanes=3)  # a final the engine is slow on
    # Three lanes: the held final takes one; an interim always finds another free.
    async with pipeline(eng, lanes=3) as h:
        h.items.deltas = True
        h.items.handle([SpeechStarted(0, 0), Utterance(0, ms(1000), 0, 0, 1000, "silence")])
        h.items.handle([SpeechStarted(1, 1500)])
        for n in (400, 600):  # two hypotheses agree on "try again": a delta is due
            h.items.handle([InterimDue(1, ms(n))])
            await until(h.item(1).interim.done, "the interim")
        first, second = h.items._turns[0].item_id, h.items._turns[1].item_id
        # Item 1 has its delta ready, but item 0 has not completed: nothing of item 1 yet.
        assert [e for e in h.sent if e.get("item_id") == second and e["type"] == DELTA] == []
        assert h.types().count("speech_started") == 2  # audio events are not held
        eng.open(1000)
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


async def test_a_pause_goes_on_the_engine_only_once_it_has_lasted_the_hold() -> None:
    """A dip between words (shorter than the hold) costs no decode; an end, held as long,
    is decoded, and its timings say when its decode started."""
    eng = engine({1000: "Ever tried", 2000: "Ever tried. Ever failed."})
    async with pipeline(eng) as h:
        h.items.speculative_hold_s = 0.064
        h.items.handle([SpeechStarted(0, 0), SpeechPaused(0, ms(1000), 1000)])
        await h.clock.advance(0.063)
        h.items.handle([SpeechResumed(0)])  # a dip: over before the hold
        h.items.handle([SpeechPaused(0, ms(2000), 2000)])
        await h.clock.advance(0.063)
        assert eng.begun == [] and h.worker.queue_depth == 0
        await h.clock.advance(0.002)
        await eng.reached(2000)
        h.items.handle([SpeechStopped(0, 1968, 2192)])
        h.items.handle([Utterance(0, ms(2192), 0, 0, 1968, "silence")])
        await h.settle()
        assert eng.begun == [2000]
        (completed,) = [e for e in h.sent if e["type"] == COMPLETED]
        assert completed["speculative"] and completed["transcript"] == "Ever tried. Ever failed."
        assert completed["timings"]["decode_after_ms"] == 2000 + 64 - 1968


async def decoded_interim(h: Harness, eng: GatedEngine, n: int) -> None:
    """Item 0's interim of its first ``n`` ms, due now: decoded in 100 ms of engine time."""
    h.items.handle([InterimDue(0, ms(n))])
    await eng.reached(n)
    await h.clock.advance(0.1)
    eng.open(n)
    await until(h.item(0).interim.done, f"the {n} ms interim")


async def test_interims_are_eager_until_the_first_delta_then_spaced_by_their_cost() -> None:
    """With ``interim_share`` 0.25, an interim whose decode took 100 ms of engine time
    holds the next one off for 300 ms more, but only once the item has sent a delta."""
    texts = {500: "No", 800: "Yes", 1100: "Yes we", 1400: "Yes we can", 1700: "Yes we can."}
    eng = engine(texts, gated=list(texts))
    async with pipeline(eng) as h:
        h.items.interim_share = 0.25

        h.items.handle([SpeechStarted(0, 0)])
        await decoded_interim(h, eng, 500)
        await decoded_interim(h, eng, 800)  # eager: disagrees with the first, no delta yet
        await decoded_interim(h, eng, 1100)  # eager still: agrees on "Yes", the first delta
        h.items.handle([InterimDue(0, ms(1400))])  # 0 ms after: held off
        await h.clock.advance(0.299)
        h.items.handle([InterimDue(0, ms(1400))])  # 299 ms after: still held off
        await h.clock.advance(0.002)
        await decoded_interim(h, eng, 1400)  # just past 300 ms after the last one's answer: decoded
        assert eng.begun == [500, 800, 1100, 1400]
        assert [e["delta"] for e in h.sent if e["type"] == DELTA] == ["Yes", " we"]


async def test_interims_stay_eager_while_the_hypotheses_disagree() -> None:
    """Until two hypotheses agree, up to ``EAGER_HYPOTHESES`` interims go at the detector's
    pace whatever they cost (read8's slowest first deltas were turns whose first words the
    model kept changing); only then are they spaced by their cost."""
    lengths = [500 + 300 * k for k in range(EAGER_HYPOTHESES + 1)]
    texts = {n: f"Word{n}" for n in lengths}  # no two agree
    eng = engine(texts, gated=lengths)
    async with pipeline(eng) as h:
        h.items.interim_share = 0.25
        h.items.handle([SpeechStarted(0, 0)])
        for n in lengths[:-1]:
            await decoded_interim(h, eng, n)  # due at once after the one before
        h.items.handle([InterimDue(0, ms(lengths[-1]))])  # one more: now spaced
        await h.settle()
        assert eng.begun == lengths[:-1]
        assert not [e for e in h.sent if e["type"] == DELTA]


async def test_interims_come_at_least_every_two_seconds_on_a_long_turn() -> None:
    """A small share would space 100-ms decodes 9.9 s apart; the gap stays under 2 s."""
    texts = {500: "No", 800: "Yes", 1100: "Yes we", 3100: "Yes we can"}
    eng = engine(texts, gated=list(texts))
    async with pipeline(eng) as h:
        h.items.interim_share = 0.01
        h.items.handle([SpeechStarted(0, 0)])
        for n in (500, 800, 1100):
            await decoded_interim(h, eng, n)
        await h.clock.advance(1.899)  # 2 s after the last one began, less 1 ms
        h.items.handle([InterimDue(0, ms(3100))])
        assert eng.begun == [500, 800, 1100]
        await h.clock.advance(0.002)
        h.items.handle([InterimDue(0, ms(3100))])
        await eng.reached(3100)
        eng.open(3100)
        await h.settle()
        assert eng.begun == [500, 800, 1100, 3100]


async def test_interims_are_drafts_and_finals_are_not() -> None:
    """Interims ask the engine for a draft (the embedded engine decodes it greedily);
    finals and speculative finals never do."""
    eng = GatedEngine(lambda key: "Fail again", key=lambda r: length_ms(r) * (-1 if r.draft else 1))
    async with pipeline(eng) as h:
        await speak(h, eng, 0, 0, interim_ms=500, end_ms=900)
        h.items.handle([SpeechStarted(1, 2000), Utterance(1, ms(700), 0, 2000, 2700, "max_length")])
        await h.settle()
        assert eng.begun == [-500, 900, 700]


async def test_a_final_is_decoded_behind_the_utterance_said_before_it() -> None:
    """A final, speculative or not, carries the previous utterance's audio and final text
    (the embedded engine hears it first); an interim never does, nor a final whose previous
    utterance is not back yet or came back with no words."""
    texts = {1000: "Ever tried.", 600: "", 700: "No matter.", 800: "Try again.", 500: "Try"}
    seen: list[tuple[int, bool, tuple[int, str] | None]] = []

    def key(request: Any) -> int:
        before = request.before
        said = None if before is None else (len(before.audio) // 16, before.text)
        seen.append((length_ms(request), request.draft, said))
        return length_ms(request)

    eng = GatedEngine(scripted(texts), key=key, gated=[1000], lanes=2)
    async with pipeline(eng, lanes=2) as h:
        h.items.handle([SpeechStarted(0, 0), Utterance(0, ms(1000), 0, 0, 1000, "silence")])
        await eng.reached(1000)
        # Cut while the first final is still on the engine: it goes alone.
        h.items.handle([SpeechStarted(1, 1500), Utterance(1, ms(600), 0, 1500, 2100, "silence")])
        await until(lambda: 600 in eng.finished, "the second final")
        eng.open(1000)
        await h.settle()
        # The one just before said nothing: alone again.
        h.items.handle([SpeechStarted(2, 3000), Utterance(2, ms(700), 0, 3000, 3700, "silence")])
        await h.settle()
        await speak(h, eng, 3, 4500, interim_ms=500, end_ms=5300)
        await h.settle()
    assert seen == [
        (1000, False, None),
        (600, False, None),
        (700, False, None),
        (500, True, None),
        (800, False, (700, "No matter.")),
    ]
    completed = [e["transcript"] for e in h.sent if e["type"] == COMPLETED]
    assert completed == ["Ever tried.", "", "No matter.", "Try again."]


async def test_a_final_behind_the_one_before_carries_the_finals_before_that() -> None:
    """The previous utterance's final text goes as ``before.text``; the finals before it
    (at most ``EARLIER_FINALS``, oldest first, those with no words left out) as
    ``before.earlier``, the embedded engine's prompt."""
    lengths = [700 + 10 * k for k in range(9)]
    texts = {ms_: f"Sentence {k}." for k, ms_ in enumerate(lengths)}
    texts[lengths[2]] = ""  # said nothing: neither context nor earlier text
    befores: list[Any] = []

    def key(request: Any) -> int:
        befores.append(request.before)
        return length_ms(request)

    eng = GatedEngine(scripted(texts), key=key)
    async with pipeline(eng) as h:
        start = 0
        for k, length in enumerate(lengths):
            h.items.handle(
                [
                    SpeechStarted(k, start),
                    Utterance(k, ms(length), 0, start, start + length, "silence"),
                ]
            )
            await h.settle()
            start += length + 800
    assert befores[0] is None and befores[3] is None  # the first, and after the empty one
    assert [(b.text, b.earlier) for b in befores[1:3]] == [
        ("Sentence 0.", ""),
        ("Sentence 1.", "Sentence 0."),
    ]
    assert befores[4].text == "Sentence 3."
    assert befores[4].earlier == "Sentence 0. Sentence 1."
    assert befores[8].text == "Sentence 7."
    assert befores[8].earlier == "Sentence 1. Sentence 3. Sentence 4. Sentence 5. Sentence 6."
    assert EARLIER_FINALS == 5


async def test_no_context_when_final_context_is_off() -> None:
    """``engine.final_context: false``: every final goes alone, as before the option."""
    befores: list[Any] = []

    def key(request: Any) -> int:
        befores.append(request.before)
        return length_ms(request)

    eng = GatedEngine(scripted({700: "No matter.", 800: "Try again."}), key=key)
    async with pipeline(eng) as h:
        h.items.final_context = False
        h.items.handle([SpeechStarted(0, 0), Utterance(0, ms(700), 0, 0, 700, "silence")])
        await h.settle()
        h.items.handle([SpeechStarted(1, 1500), Utterance(1, ms(800), 0, 1500, 2300, "silence")])
        await h.settle()
    assert befores == [None, None]
    completed = [e["transcript"] for e in h.sent if e["type"] == COMPLETED]
    assert completed == ["No matter.", "Try again."]

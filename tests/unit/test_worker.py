"""The engine worker with fake engines on a hand-moved clock: batching, priorities, skipped
interims, bounds. The engine's calls wait at gates the test opens, so each test steps through
the worker's states in order on any machine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.config import EngineConfig
from agent.engines.base import EngineRequest
from agent.engines.worker import EngineWorker, Priority
from agent.errors import EngineError
from tests.support.clock import ManualClock, until
from tests.support.engine_gate import GatedEngine


def audio(tag: int, seconds: float = 0.1) -> np.ndarray:
    """Audio whose first sample identifies the request."""
    a = np.zeros(int(16000 * seconds), np.float32)
    a[0] = tag
    return a


def echo(tag: int) -> str:
    if tag < 0:
        raise ValueError(f"bad item {tag}")
    return f"t{tag}"


async def start(engine: GatedEngine, clock: ManualClock, **kw: int) -> EngineWorker:
    cfg = EngineConfig(**{"max_batch": 8, "max_wait_ms": 5, "lanes": 1, **kw})
    return await EngineWorker.start(cfg, engine, clock)


def submit(worker: EngineWorker, tag: int, priority: Priority = Priority.FINAL) -> asyncio.Task:
    return asyncio.ensure_future(worker.transcribe(EngineRequest(audio(tag)), priority))


async def test_requests_within_the_batch_wait_share_one_batch() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo)
    worker = await start(engine, clock)
    try:
        first = submit(worker, 1)
        await until(lambda: clock.sleeping == 1, "the lane waiting to fill a batch")
        rest = [submit(worker, i) for i in range(2, 6)]
        await until(lambda: worker.queue_depth == 5)
        await clock.advance(0.004)
        assert engine.batches == []  # still within max_wait_ms
        await clock.advance(0.001)
        results = await asyncio.gather(first, *rest)
        assert [r.text for r in results] == ["t1", "t2", "t3", "t4", "t5"]
        assert engine.batches == [[1, 2, 3, 4, 5]]
        assert [(r.batch_size, r.queue_ms) for r in results] == [(5, pytest.approx(5.0))] * 5
    finally:
        await worker.close()


async def test_bad_item_fails_alone() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo)
    worker = await start(engine, clock)
    try:
        tasks = [submit(worker, t) for t in (1, -2, 3)]
        await until(lambda: clock.sleeping == 1 and worker.queue_depth == 3)
        await clock.advance(0.005)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], EngineError) and "bad item" in str(results[1])
        assert [r.text for r in (results[0], results[2])] == ["t1", "t3"]  # type: ignore[union-attr]
        assert engine.batches == [[1, -2, 3], [1], [-2], [3]]  # the batch, then one by one
        assert worker.failed == 1 and worker.completed == 2
    finally:
        await worker.close()


async def test_finals_go_first_and_stale_interims_are_skipped() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo, gated=[100])
    worker = await start(engine, clock, max_batch=1, interim_interval_ms=300)
    try:
        busy = submit(worker, 100)
        await engine.reached(100)  # the engine is busy; interims queue before finals
        interims = [submit(worker, 200 + i, Priority.INTERIM) for i in range(3)]
        fresh = submit(worker, 250, Priority.INTERIM)
        finals = [submit(worker, 300 + i) for i in range(3)]
        await until(lambda: worker.queue_depth == 7)
        await clock.advance(0.3)
        late = submit(worker, 260, Priority.INTERIM)  # queued now: 300 ms younger
        await clock.advance(0.0001)  # the first interims waited over 300 ms
        engine.open(100)
        await asyncio.gather(busy, *finals)
        done = await asyncio.gather(*interims, fresh, late, return_exceptions=True)
        order = [b[0] for b in engine.batches]
        assert order == [100, 300, 301, 302, 260]  # finals overtake the earlier interims
        # The interims that waited > 300 ms: skipped, counted, never decoded.
        assert all(isinstance(d, EngineError) and d.code == "interim_skipped" for d in done[:4])
        assert done[4].text == "t260"  # type: ignore[union-attr]
        assert worker.skipped_interims == 4
    finally:
        await worker.close()


async def test_queue_is_bounded_and_interims_refused_first() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo, gated=[1])
    worker = await start(engine, clock, max_batch=1, max_queue=2)
    try:
        busy = submit(worker, 1)
        await engine.reached(1)
        queued = [submit(worker, i) for i in (2, 3)]
        await until(lambda: worker.queue_depth == 2)
        with pytest.raises(EngineError) as interim:
            await worker.transcribe(EngineRequest(audio(4)), Priority.INTERIM)
        assert interim.value.code == "interim_skipped"
        with pytest.raises(EngineError) as final:
            await worker.transcribe(EngineRequest(audio(5)))
        assert final.value.code == "queue_full"
        engine.open(1)
        await asyncio.gather(busy, *queued)
        assert worker.skipped_interims == 1
        assert [b[0] for b in engine.batches] == [1, 2, 3]
    finally:
        await worker.close()


async def test_withdrawn_request_is_never_decoded() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo, gated=[1])
    worker = await start(engine, clock, max_batch=1)
    try:
        busy = submit(worker, 1)
        await engine.reached(1)
        withdrawn = submit(worker, 2)
        await until(lambda: worker.queue_depth == 1)
        withdrawn.cancel()
        engine.open(1)
        await busy
        await worker.transcribe(EngineRequest(audio(3)))
        assert [b[0] for b in engine.batches] == [1, 3]
    finally:
        await worker.close()


async def test_second_lane_keeps_finals_free_of_interims() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo, gated=[7], lanes=2)
    worker = await start(engine, clock, max_batch=1, lanes=2)
    try:
        assert worker.lanes == 2
        interim = submit(worker, 7, Priority.INTERIM)
        await engine.reached(7)  # the interim holds lane 1 until its gate opens
        final = await worker.transcribe(EngineRequest(audio(8)))  # lane 0, beside it
        assert final.text == "t8" and not interim.done()
        engine.open(7)
        assert (await interim).text == "t7"
    finally:
        await worker.close()


async def test_live_finals_before_file_pieces_before_interims() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo, gated=[1])
    worker = await start(engine, clock, max_batch=1, interim_interval_ms=5000)
    try:
        busy = submit(worker, 1)
        await engine.reached(1)
        queued = [
            submit(worker, tag, prio)
            for tag, prio in (
                (30, Priority.INTERIM),
                (20, Priority.FILE),
                (10, Priority.FINAL),
                (21, Priority.FILE),
            )
        ]
        await until(lambda: worker.queue_depth == 4)
        engine.open(1)
        await asyncio.gather(busy, *queued)
        assert [b[0] for b in engine.batches] == [1, 10, 20, 21, 30]
    finally:
        await worker.close()


async def test_engine_that_loops_over_items_gets_batches_of_one() -> None:
    clock = ManualClock()
    engine = GatedEngine(echo, gated=[1, 2, 3])
    engine.max_batch = 1  # like the embedded Whisper engine
    worker = await start(engine, clock, max_batch=8)
    try:
        tasks = [submit(worker, i) for i in (1, 2, 3)]
        for i in (1, 2, 3):
            await engine.reached(i)
            await clock.advance(0.05)  # each call takes 50 ms of the worker's clock
            engine.open(i)
        results = await asyncio.gather(*tasks)
        assert engine.batches == [[1], [2], [3]]
        # Each item reports its own engine time, not a whole batch's, and waited for the
        # calls before it.
        assert [r.batch_size for r in results] == [1, 1, 1]
        assert [r.engine_ms for r in results] == pytest.approx([50, 50, 50])
        assert [r.queue_ms for r in results] == pytest.approx([0, 50, 100])
    finally:
        await worker.close()

"""The engine worker with fake engines: batching, priorities, skipped interims, bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from agent.config import EngineConfig
from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.engines.worker import EngineWorker, Priority
from agent.errors import EngineError


def audio(tag: int, seconds: float = 0.1) -> np.ndarray:
    """Audio whose first sample identifies the request."""
    a = np.zeros(int(16000 * seconds), np.float32)
    a[0] = tag
    return a


class SlowEcho(Engine):
    """Echoes each request's tag after ``delay`` s per call; records the batches it saw."""

    name = "slow-echo"

    def __init__(self, delay: float, lanes: int = 1) -> None:
        self.delay = delay
        self.max_lanes = lanes
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        tags = [int(r.audio[0]) for r in batch]
        with self.lock:
            self.batches.append(tags)
        if any(t < 0 for t in tags):
            raise ValueError(f"bad item {tags}")
        time.sleep(self.delay)
        return [EngineResult(f"t{t}") for t in tags]


async def start(engine: Engine, **kw: int) -> EngineWorker:
    cfg = EngineConfig(**{"max_batch": 8, "max_wait_ms": 5, "lanes": 1, **kw})
    return await EngineWorker.start(cfg, engine)


async def test_concurrent_requests_share_one_batch() -> None:
    engine = SlowEcho(0.05)
    worker = await start(engine)
    try:
        results = await asyncio.gather(
            *(worker.transcribe(EngineRequest(audio(i))) for i in range(1, 6))
        )
        assert [r.text for r in results] == ["t1", "t2", "t3", "t4", "t5"]
        assert engine.batches == [[1, 2, 3, 4, 5]]
        assert all(r.batch_size == 5 for r in results)
    finally:
        await worker.close()


async def test_bad_item_fails_alone() -> None:
    engine = SlowEcho(0.0)
    worker = await start(engine)
    try:
        results = await asyncio.gather(
            *(worker.transcribe(EngineRequest(audio(t))) for t in (1, -2, 3)),
            return_exceptions=True,
        )
        assert isinstance(results[1], EngineError) and "bad item" in str(results[1])
        assert [r.text for r in (results[0], results[2])] == ["t1", "t3"]  # type: ignore[union-attr]
        assert worker.failed == 1 and worker.completed == 2
    finally:
        await worker.close()


async def test_finals_go_first_and_stale_interims_are_skipped() -> None:
    engine = SlowEcho(0.2)
    worker = await start(engine, max_batch=1, interim_interval_ms=300)
    try:
        # Occupy the engine, then queue interims before finals.
        busy = asyncio.ensure_future(worker.transcribe(EngineRequest(audio(100))))
        await asyncio.sleep(0.05)
        interims = [
            asyncio.ensure_future(
                worker.transcribe(EngineRequest(audio(200 + i)), Priority.INTERIM)
            )
            for i in range(3)
        ]
        finals = [
            asyncio.ensure_future(worker.transcribe(EngineRequest(audio(300 + i))))
            for i in range(3)
        ]
        await asyncio.gather(busy, *finals)
        done = await asyncio.gather(*interims, return_exceptions=True)
        order = [b[0] for b in engine.batches]
        assert order[:4] == [100, 300, 301, 302]  # finals overtake the earlier interims
        # By then the interims waited > 300 ms: skipped, counted, never decoded.
        assert all(isinstance(d, EngineError) and d.code == "interim_skipped" for d in done)
        assert worker.skipped_interims == 3
        assert not {200, 201, 202} & set(order)
    finally:
        await worker.close()


async def test_queue_is_bounded_and_interims_refused_first() -> None:
    engine = SlowEcho(0.3)
    worker = await start(engine, max_batch=1, max_queue=2)
    try:
        busy = asyncio.ensure_future(worker.transcribe(EngineRequest(audio(1))))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(worker.transcribe(EngineRequest(audio(i)))) for i in (2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(EngineError) as interim:
            await worker.transcribe(EngineRequest(audio(4)), Priority.INTERIM)
        assert interim.value.code == "interim_skipped"
        with pytest.raises(EngineError) as final:
            await worker.transcribe(EngineRequest(audio(5)))
        assert final.value.code == "queue_full"
        await asyncio.gather(busy, *queued)
        assert worker.skipped_interims == 1
    finally:
        await worker.close()


async def test_withdrawn_request_is_never_decoded() -> None:
    engine = SlowEcho(0.2)
    worker = await start(engine, max_batch=1)
    try:
        busy = asyncio.ensure_future(worker.transcribe(EngineRequest(audio(1))))
        await asyncio.sleep(0.05)
        withdrawn = asyncio.ensure_future(worker.transcribe(EngineRequest(audio(2))))
        await asyncio.sleep(0.01)
        withdrawn.cancel()
        await busy
        await worker.transcribe(EngineRequest(audio(3)))
        assert [b[0] for b in engine.batches] == [1, 3]
    finally:
        await worker.close()


async def test_second_lane_keeps_finals_free_of_interims() -> None:
    engine = SlowEcho(0.3, lanes=2)
    worker = await start(engine, max_batch=1, lanes=2)
    try:
        assert worker.lanes == 2
        interim = asyncio.ensure_future(
            worker.transcribe(EngineRequest(audio(7)), Priority.INTERIM)
        )
        await asyncio.sleep(0.05)  # the interim is running on lane 1
        started = time.perf_counter()
        await worker.transcribe(EngineRequest(audio(8)))
        waited = time.perf_counter() - started
        assert waited < 0.3 + 0.2  # ran beside the interim, not after it
        assert (await interim).text == "t7"
    finally:
        await worker.close()


async def test_live_finals_before_file_pieces_before_interims() -> None:
    engine = SlowEcho(0.1)
    worker = await start(engine, max_batch=1, interim_interval_ms=5000)
    try:
        busy = asyncio.ensure_future(worker.transcribe(EngineRequest(audio(1))))
        await asyncio.sleep(0.03)
        queued = [
            asyncio.ensure_future(worker.transcribe(EngineRequest(audio(tag)), prio))
            for tag, prio in (
                (30, Priority.INTERIM),
                (20, Priority.FILE),
                (10, Priority.FINAL),
                (21, Priority.FILE),
            )
        ]
        await asyncio.gather(busy, *queued)
        assert [b[0] for b in engine.batches] == [1, 10, 20, 21, 30]
    finally:
        await worker.close()


async def test_engine_that_loops_over_items_gets_batches_of_one() -> None:
    engine = SlowEcho(0.05)
    engine.max_batch = 1  # like the embedded Whisper engine
    worker = await start(engine, max_batch=8)
    try:
        results = await asyncio.gather(
            *(worker.transcribe(EngineRequest(audio(i))) for i in range(1, 4))
        )
        assert engine.batches == [[1], [2], [3]]
        # Each item reports its own engine time, not a whole batch's.
        assert all(r.batch_size == 1 and r.engine_ms < 150 for r in results)
    finally:
        await worker.close()

"""The engine worker's watchdog and lag figure, with fake engines."""

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


class HangsOnce(Engine):
    """The first call blocks until released (or ``hang_s``); later calls answer at once."""

    name = "hangs-once"

    def __init__(self, hang_s: float = 10.0) -> None:
        self.release = threading.Event()
        self.hang_s = hang_s
        self.calls = 0
        self.threads: list[int] = []

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.calls == 1:
            self.release.wait(self.hang_s)
        return [EngineResult("ok") for _ in batch]


def request() -> EngineRequest:
    return EngineRequest(np.zeros(1600, np.float32))


async def test_a_hung_call_fails_with_engine_timeout_and_a_new_thread_serves() -> None:
    engine = HangsOnce()
    cfg = EngineConfig(lanes=1, max_wait_ms=0, watchdog_s=0.3)
    batches: list[tuple[Priority, int, float]] = []
    worker = await EngineWorker.start(cfg, engine)
    worker.on_batch = lambda p, n, s: batches.append((p, n, s))
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            worker.transcribe(request()), worker.transcribe(request()), return_exceptions=True
        )
        assert time.perf_counter() - t0 < 2
        # Both were in the hung batch: both fail, without a one-by-one retry that would hang.
        assert all(isinstance(r, EngineError) and r.code == "engine_timeout" for r in results)
        assert engine.calls == 1
        assert worker.timeouts == 1 and worker.degraded and worker.failed == 2
        ok = await asyncio.wait_for(worker.transcribe(request()), 2)
        assert ok.text == "ok"
        assert engine.threads[0] != engine.threads[1]  # a fresh thread took over
        engine.release.set()  # the hung call returns at last: no longer degraded
        for _ in range(100):
            if not worker.degraded:
                break
            await asyncio.sleep(0.01)
        assert not worker.degraded
        assert [(p, n) for p, n, _ in batches] == [(Priority.FINAL, 2), (Priority.FINAL, 1)]
    finally:
        engine.release.set()
        await worker.close()


async def test_lag_is_the_wait_of_the_oldest_queued_final() -> None:
    engine = HangsOnce(hang_s=0.6)
    worker = await EngineWorker.start(EngineConfig(lanes=1, max_wait_ms=0), engine)
    try:
        assert worker.lag_ms() == 0.0
        first = asyncio.ensure_future(worker.transcribe(request()))  # runs, hangs 0.6 s
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(worker.transcribe(request()))  # waits behind it
        await asyncio.sleep(0.3)
        assert 250 <= worker.lag_ms() <= 600
        await asyncio.gather(first, second)
        assert worker.lag_ms() == 0.0
    finally:
        engine.release.set()
        await worker.close()


@pytest.mark.parametrize("hung", [False, True])
async def test_close_never_waits_for_a_hung_thread(hung: bool) -> None:
    engine = HangsOnce(hang_s=3.0)
    worker = await EngineWorker.start(EngineConfig(lanes=1, max_wait_ms=0, watchdog_s=0.2), engine)
    if hung:
        with pytest.raises(EngineError):
            await worker.transcribe(request())
    t0 = time.perf_counter()
    await worker.close()
    assert time.perf_counter() - t0 < 1
    engine.release.set()


class BatchFailsThenHangs(Engine):
    """A batch of several raises; retried alone, the first utterance hangs."""

    name = "batch-fails-then-hangs"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.singles = 0

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        if len(batch) > 1:
            raise ValueError("bad batch")
        self.singles += 1
        self.release.wait(5)
        return [EngineResult("late")]


async def test_one_by_one_retry_stops_feeding_a_hung_engine() -> None:
    engine = BatchFailsThenHangs()
    worker = await EngineWorker.start(EngineConfig(lanes=1, max_wait_ms=20, watchdog_s=0.3), engine)
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(worker.transcribe(request()) for _ in range(3)), return_exceptions=True
        )
        assert time.perf_counter() - t0 < 1.0  # one watchdog period, not three
        assert all(isinstance(r, EngineError) and r.code == "engine_timeout" for r in results)
        assert engine.singles == 1
    finally:
        engine.release.set()
        await worker.close()

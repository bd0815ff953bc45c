"""The engine worker's watchdog and lag figure, with fake engines on a hand-moved clock: the
watchdog fires when the test moves the clock past it, while the engine thread really hangs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from agent.config import EngineConfig
from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.engines.worker import EngineWorker, Priority
from agent.errors import EngineError
from tests.support.clock import REAL_TIMEOUT_S, ManualClock, until


class HangsOnce(Engine):
    """The first call blocks until released; later calls answer at once."""

    name = "hangs-once"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.threads: list[int] = []

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.calls == 1:
            assert self.release.wait(REAL_TIMEOUT_S), "the test never released the engine"
        return [EngineResult("ok") for _ in batch]


def request() -> EngineRequest:
    return EngineRequest(np.zeros(1600, np.float32))


async def test_a_hung_call_fails_with_engine_timeout_and_a_new_thread_serves() -> None:
    clock = ManualClock()
    engine = HangsOnce()
    cfg = EngineConfig(lanes=1, max_wait_ms=0, watchdog_s=0.3)
    batches: list[tuple[Priority, int, float]] = []
    worker = await EngineWorker.start(cfg, engine, clock)
    worker.on_batch = lambda p, n, s: batches.append((p, n, s))
    try:
        both = asyncio.gather(
            worker.transcribe(request()), worker.transcribe(request()), return_exceptions=True
        )
        await until(lambda: engine.calls == 1 and clock.sleeping == 1, "the call on the engine")
        await clock.advance(0.29)
        assert not both.done()  # the watchdog has not fired yet
        await clock.advance(0.01)
        results = await both
        # Both were in the hung batch: both fail, without a one-by-one retry that would hang.
        assert all(isinstance(r, EngineError) and r.code == "engine_timeout" for r in results)
        assert engine.calls == 1
        assert worker.timeouts == 1 and worker.degraded and worker.failed == 2
        ok = await worker.transcribe(request())  # while the first thread still hangs
        assert ok.text == "ok"
        assert engine.threads[0] != engine.threads[1]  # a fresh thread took over
        engine.release.set()  # the hung call returns at last: no longer degraded
        await until(lambda: not worker.degraded, "the hung call's return")
        assert [(p, n) for p, n, _ in batches] == [(Priority.FINAL, 2), (Priority.FINAL, 1)]
        assert batches[0][2] == pytest.approx(0.3)  # the hung batch's engine time
    finally:
        engine.release.set()
        await worker.close()


async def test_lag_is_the_wait_of_the_oldest_queued_final() -> None:
    clock = ManualClock()
    engine = HangsOnce()
    worker = await EngineWorker.start(EngineConfig(lanes=1, max_wait_ms=0), engine, clock)
    try:
        assert worker.lag_ms() == 0.0
        first = asyncio.ensure_future(worker.transcribe(request()))  # runs, held
        await until(lambda: engine.calls == 1)
        assert worker.lag_ms() == 0.0  # running is not waiting
        second = asyncio.ensure_future(worker.transcribe(request()))  # waits behind it
        await until(lambda: worker.queue_depth == 1)
        await clock.advance(0.3)
        assert worker.lag_ms() == pytest.approx(300)
        engine.release.set()
        await asyncio.gather(first, second)
        assert worker.lag_ms() == 0.0
    finally:
        engine.release.set()
        await worker.close()


@pytest.mark.parametrize("hung", [False, True])
async def test_close_never_waits_for_a_hung_thread(hung: bool) -> None:
    clock = ManualClock()
    engine = HangsOnce()
    cfg = EngineConfig(lanes=1, max_wait_ms=0, watchdog_s=0.2)
    worker = await EngineWorker.start(cfg, engine, clock)
    if hung:
        call = asyncio.ensure_future(worker.transcribe(request()))
        await until(lambda: clock.sleeping == 1)
        await clock.advance(0.2)
        with pytest.raises(EngineError):
            await call
    closing = asyncio.ensure_future(worker.close())
    # No clock moves: nothing in close waits on the hung thread (a fresh pool closes the
    # engine); had it joined the thread, the loop itself would block here.
    await until(closing.done, "close")
    await closing
    assert engine.calls == int(hung) and not engine.release.is_set()
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
        assert self.release.wait(REAL_TIMEOUT_S), "the test never released the engine"
        return [EngineResult("late")]


async def test_one_by_one_retry_stops_feeding_a_hung_engine() -> None:
    clock = ManualClock()
    engine = BatchFailsThenHangs()
    cfg = EngineConfig(lanes=1, max_wait_ms=20, watchdog_s=0.3)
    worker = await EngineWorker.start(cfg, engine, clock)
    try:
        calls = asyncio.gather(
            *(worker.transcribe(request()) for _ in range(3)), return_exceptions=True
        )
        await until(lambda: worker.queue_depth == 3 and clock.sleeping == 1)
        await clock.advance(0.02)  # the batch wait: one batch of three, which raises
        await until(lambda: engine.singles == 1 and clock.sleeping == 1, "the first retry")
        await clock.advance(0.3)  # one watchdog period, not three
        results = await calls
        assert all(isinstance(r, EngineError) and r.code == "engine_timeout" for r in results)
        assert engine.singles == 1
    finally:
        engine.release.set()
        await worker.close()

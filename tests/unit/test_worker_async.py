"""The engine worker with a fake ``AsyncEngine``: priorities, the concurrency bound, queue
bounds, timings, and withdrawal that really stops the request."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.config import EngineConfig
from agent.engines.base import AsyncEngine, EngineRequest, EngineResult, Priority
from agent.engines.worker import EngineWorker
from agent.errors import EngineError


def audio(tag: int) -> np.ndarray:
    a = np.zeros(1600, np.float32)
    a[0] = tag
    return a


class Held(AsyncEngine):
    """Each request waits until the test releases its tag; records starts and cancellations."""

    name = "held"

    def __init__(self, concurrency: int) -> None:
        self.max_concurrency = concurrency
        self.started: list[int] = []
        self.priorities: list[Priority] = []
        self.cancelled: list[int] = []
        self.running = 0
        self.peak = 0
        self.gates: dict[int, asyncio.Event] = {}
        self.fail: dict[int, EngineError] = {}
        self.down = False
        self.opened = self.closed = False

    async def start(self) -> None:
        self.opened = True

    async def aclose(self) -> None:
        self.closed = True

    @property
    def degraded(self) -> bool:
        return self.down

    def release(self, *tags: int) -> None:
        for tag in tags:
            self.gates.setdefault(tag, asyncio.Event()).set()

    async def transcribe_one(self, request: EngineRequest, priority: Priority) -> EngineResult:
        tag = int(request.audio[0])
        self.started.append(tag)
        self.priorities.append(priority)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gates.setdefault(tag, asyncio.Event()).wait()
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        finally:
            self.running -= 1
        if tag in self.fail:
            raise self.fail[tag]
        return EngineResult(f"t{tag}", "en")


async def start(engine: Held, **kw: object) -> EngineWorker:
    config = EngineConfig(**{"lanes": 1, "interim_interval_ms": 0, **kw})  # type: ignore[arg-type]
    return await EngineWorker.start(config, engine)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrency_bound_and_finals_before_interims() -> None:
    engine = Held(concurrency=3)
    worker = await start(engine)
    try:
        assert engine.opened and worker.lanes == 3
        interims = [
            asyncio.create_task(worker.transcribe(EngineRequest(audio(t)), Priority.INTERIM))
            for t in (1, 2, 3)
        ]
        await settle()
        # One slot is kept for finals: interims take at most two.
        assert sorted(engine.started) == [1, 2]
        final = asyncio.create_task(worker.transcribe(EngineRequest(audio(10))))
        await settle()
        assert engine.started[-1] == 10 and engine.peak == 3
        engine.release(10)
        result = await final
        assert (result.text, result.language, result.batch_size) == ("t10", "en", 1)
        assert result.engine_ms >= 0 and result.queue_ms >= 0
        engine.release(1, 2, 3)
        assert [(await t).text for t in interims] == ["t1", "t2", "t3"]
        assert worker.completed == 1 and worker.completed_interims == 3
        assert engine.peak == 3
    finally:
        await worker.close()
    assert engine.closed


async def test_withdrawing_a_request_cancels_it_in_flight() -> None:
    engine = Held(concurrency=2)
    worker = await start(engine)
    try:
        started = asyncio.Event()
        speculation = asyncio.create_task(
            worker.transcribe(EngineRequest(audio(7)), Priority.FINAL, started)
        )
        await settle()
        assert engine.started == [7]
        # A remote request can be stopped: the caller is never told "too late to withdraw".
        assert not started.is_set()
        speculation.cancel()
        await settle()
        assert engine.cancelled == [7] and engine.running == 0
        assert worker.completed == worker.failed == 0
        engine.release(8)
        assert (await worker.transcribe(EngineRequest(audio(8)))).text == "t8"
    finally:
        await worker.close()


async def test_failures_keep_their_code_and_timeouts_are_counted() -> None:
    engine = Held(concurrency=2)
    engine.fail = {
        1: EngineError("no server", "engine_unavailable"),
        2: EngineError("slow", "engine_timeout"),
    }
    engine.release(1, 2)
    worker = await start(engine)
    try:
        for tag, code in ((1, "engine_unavailable"), (2, "engine_timeout")):
            with pytest.raises(EngineError) as err:
                await worker.transcribe(EngineRequest(audio(tag)))
            assert err.value.code == code
        assert worker.failed == 2 and worker.timeouts == 1
    finally:
        await worker.close()


async def test_the_watchdog_bounds_an_engine_that_never_answers() -> None:
    engine = Held(concurrency=1)
    worker = await start(engine, watchdog_s=0.2)
    try:
        with pytest.raises(EngineError) as err:
            await worker.transcribe(EngineRequest(audio(1)))
        assert err.value.code == "engine_timeout"
        assert engine.cancelled == [1] and worker.timeouts == 1
        assert not worker.degraded  # the request was stopped, nothing is left hanging
    finally:
        await worker.close()


async def test_degraded_follows_the_engine_and_the_queue_is_bounded() -> None:
    engine = Held(concurrency=1)
    worker = await start(engine, max_queue=1)
    try:
        assert not worker.degraded
        engine.down = True
        assert worker.degraded
        engine.down = False
        first = asyncio.create_task(worker.transcribe(EngineRequest(audio(1))))
        await settle()
        queued = asyncio.create_task(worker.transcribe(EngineRequest(audio(2))))
        await settle()
        assert worker.queue_depth == 1
        with pytest.raises(EngineError) as err:
            await worker.transcribe(EngineRequest(audio(3)))
        assert err.value.code == "queue_full"
        engine.release(1, 2)
        assert [(await t).text for t in (first, queued)] == ["t1", "t2"]
        assert (await queued).queue_ms > 0
    finally:
        await worker.close()


async def test_close_stops_requests_in_flight_and_fails_the_queue() -> None:
    engine = Held(concurrency=1)
    worker = await start(engine)
    running = asyncio.create_task(worker.transcribe(EngineRequest(audio(1))))
    await settle()
    waiting = asyncio.create_task(worker.transcribe(EngineRequest(audio(2))))
    await settle()
    await worker.close()
    assert engine.cancelled == [1] and engine.closed
    with pytest.raises(EngineError) as err:
        await waiting
    assert err.value.code == "shutdown"
    assert running.done()
    with pytest.raises(EngineError) as err:
        await running
    assert err.value.code == "shutdown"
    with pytest.raises(EngineError):
        await worker.transcribe(EngineRequest(audio(3)))


class Sized(Held):
    """``slots`` set by the test, as the remote engine's follows what its servers say."""

    def __init__(self, concurrency: int, slots: int) -> None:
        super().__init__(concurrency)
        self.now = slots

    @property
    def slots(self) -> int:
        return self.now


async def test_the_engine_slots_bound_what_runs_and_each_request_has_its_priority() -> None:
    engine = Sized(concurrency=16, slots=2)
    worker = await start(engine)
    try:
        interims = [
            asyncio.create_task(worker.transcribe(EngineRequest(audio(t)), Priority.INTERIM))
            for t in (1, 2)
        ]
        await settle()
        final = asyncio.create_task(worker.transcribe(EngineRequest(audio(10))))
        await settle()
        # 2 slots, one kept for finals: one interim and the final run, not 16 requests.
        assert engine.started == [1, 10] and engine.peak == 2
        assert engine.priorities == [Priority.INTERIM, Priority.FINAL]
        engine.now = 3  # the server said it runs more: read at the next finished request
        engine.release(10)
        assert (await final).text == "t10"
        await settle()
        assert sorted(engine.started) == [1, 2, 10]
        engine.release(1, 2)
        assert [(await t).text for t in interims] == ["t1", "t2"]
    finally:
        await worker.close()

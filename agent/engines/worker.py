"""The engine worker: the engine's threads, and the batching and priorities in front of them.

Every session submits utterances here. Requests that wait at the same moment are grouped
into one ``Engine.transcribe`` call (up to ``max_batch``, waiting at most ``max_wait_ms`` to
fill a batch), so a GPU engine decodes many calls in one forward. Finals always go before
interims; with more than one lane, lane 0 takes finals only, so a final never waits behind
an interim. An interim that waited longer than one interim interval is skipped (a newer one
is due anyway) and counted. A batch that raises is retried item by item so one bad
utterance fails alone. The queue is bounded: past ``max_queue`` a request fails at once.

A watchdog bounds every engine call to ``watchdog_s``: a call that hangs fails its utterances
with ``engine_timeout`` and its thread pool is abandoned for a fresh one, so later utterances
still run. Python cannot kill a thread: the hung call keeps its thread (and, for a GPU engine,
possibly the device) until it returns; ``degraded`` says so until then, and ``/readyz``
reports it. A GPU engine that never returns needs a restart of the process.

An ``AsyncEngine`` (the remote engine: its work happens on another server) runs on the event
loop instead: up to its ``slots`` requests at once, one task each, taken from the
same queues in the same order (one slot kept for finals, as lane 0 is), with the same
bounds, timings and counters. Its requests can really be stopped, so withdrawing one
(cancelling the caller) cancels its task at any time: ``started`` is never set for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agent.clock import SYSTEM_CLOCK, Clock, wait_for
from agent.config import EngineConfig
from agent.engines.base import (
    AsyncEngine,
    Engine,
    EngineRequest,
    EngineResult,
    StreamingEngine,
)
from agent.engines.base import Priority as Priority  # re-exported: sessions import it here
from agent.errors import EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transcription:
    """What a session gets back for one utterance."""

    text: str
    language: str | None
    queue_ms: float
    engine_ms: float
    batch_size: int


@dataclass(eq=False)
class _Job:
    request: EngineRequest
    future: asyncio.Future[Transcription]
    priority: Priority
    #: The worker clock's time when it was queued.
    submitted: float
    started: asyncio.Event | None = None


class EngineWorker:
    """Owns the engine, its threads and the lane tasks. Start once, share everywhere."""

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        config: EngineConfig,
        executor: ThreadPoolExecutor | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.engine = engine
        self._config = config
        #: Batch waits, stale interims, the watchdog and every timing read this clock.
        self.clock = clock
        if isinstance(engine, AsyncEngine):
            self.lanes = max(1, engine.max_concurrency)
            self.max_batch = 1
        else:
            self.lanes = max(1, min(config.lanes, engine.max_lanes))
            #: An engine that loops over items gains nothing from batches: each item would
            #: only wait for the others (measured by bench/latency.py): batches of one.
            self.max_batch = max(1, min(config.max_batch, engine.max_batch))
        self._queues: dict[Priority, deque[_Job]] = {p: deque() for p in Priority}
        self._work = asyncio.Condition()
        # The engine's threads for its whole life: load, warm-up and every batch run here,
        # which keeps thread-bound state (CUDA streams, compiled graphs) in one place.
        self._executor = executor or ThreadPoolExecutor(
            max_workers=self.lanes, thread_name_prefix="engine"
        )
        self._tasks: list[asyncio.Task[None]] = []
        #: An ``AsyncEngine``'s requests in flight, one task each, and their jobs.
        self._requests: dict[asyncio.Task[None], _Job] = {}
        self.skipped_interims = 0
        #: Finals transcribed / failed, and interims transcribed (counters for tests, metrics).
        self.completed = 0
        self.failed = 0
        self.completed_interims = 0
        #: Engine calls stopped by the watchdog, and those of them still running (abandoned).
        self.timeouts = 0
        self._hung: set[concurrent.futures.Future[list[EngineResult]]] = set()
        #: Called after every engine call with (priority, batch size, seconds): metrics.
        self.on_batch: Callable[[Priority, int, float], None] | None = None

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        engine: Engine | AsyncEngine | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> EngineWorker:
        """Load (unless given) and warm up the engine on its thread, then serve."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=config.lanes, thread_name_prefix="engine")
        try:
            if engine is None:
                from agent.engines import create_engine

                engine = await loop.run_in_executor(executor, create_engine, config)
            if isinstance(engine, AsyncEngine):
                executor.shutdown(wait=True)  # idle: its threads are for blocking engines
                return await cls._start_async(engine, config, clock)
            await loop.run_in_executor(executor, engine.warmup)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        worker = cls(engine, config, executor, clock)
        worker._tasks = [
            asyncio.create_task(
                worker._lane(finals_only=worker.lanes > 1 and i == 0), name=f"engine-lane-{i}"
            )
            for i in range(worker.lanes)
        ]
        return worker

    @classmethod
    async def _start_async(
        cls, engine: AsyncEngine, config: EngineConfig, clock: Clock
    ) -> EngineWorker:
        await engine.start()
        worker = cls(engine, config, clock=clock)
        worker._tasks = [asyncio.create_task(worker._dispatch(), name="engine-dispatch")]
        return worker

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def degraded(self) -> bool:
        """An engine call passed the watchdog and has still not returned, or an
        ``AsyncEngine`` cannot serve at all (its backends unreachable)."""
        return bool(self._hung) or (isinstance(self.engine, AsyncEngine) and self.engine.degraded)

    def lag_ms(self) -> float:
        """How long the oldest final still waiting for the engine has waited: 0 when none
        waits, and growing when the engine falls behind real time."""
        now = self.clock.now()
        for job in self._queues[Priority.FINAL]:
            if not job.future.done():
                return (now - job.submitted) * 1000
        if isinstance(self.engine, StreamingEngine):
            return self.engine.lag_ms()  # streams do not queue: their audio waits instead
        return 0.0

    async def transcribe(
        self,
        request: EngineRequest,
        priority: Priority = Priority.FINAL,
        started: asyncio.Event | None = None,
    ) -> Transcription:
        """Queue one utterance and wait for its text. Raises ``EngineError`` on failure.

        Cancelling the caller withdraws the request if it has not started yet. ``started``,
        if given, is set when the request goes to the engine: from then on withdrawing it
        saves nothing, so a caller may rather use the result.
        """
        if not self._tasks or all(t.done() for t in self._tasks):
            raise EngineError("the engine is not running", code="engine_unavailable")
        if self.queue_depth >= self._config.max_queue:
            if priority is Priority.INTERIM:
                self.skipped_interims += 1
                raise EngineError("interim skipped: the engine is busy", "interim_skipped")
            raise EngineError("the engine queue is full", code="queue_full")
        future = asyncio.get_running_loop().create_future()
        job = _Job(request, future, priority, self.clock.now(), started)
        self._queues[priority].append(job)
        async with self._work:
            self._work.notify_all()
        return await job.future

    async def close(self) -> None:
        """Stop serving, fail what still waits, release the engine and its threads."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for queue in self._queues.values():
            while queue:
                job = queue.popleft()
                if not job.future.done():
                    job.future.set_exception(EngineError("server shutting down", "shutdown"))
        if isinstance(self.engine, AsyncEngine):
            await self._close_async(self.engine)
            return
        loop = asyncio.get_running_loop()
        closing = loop.run_in_executor(self._executor, self.engine.close)
        try:
            await wait_for(self.clock, closing, self._config.watchdog_s)
        except TimeoutError:
            log.error("the engine did not close within %g s", self._config.watchdog_s)
        # A hung engine thread cannot be joined; waiting for it would hang the shutdown.
        self._executor.shutdown(wait=not self.degraded and closing.done())

    def _has_work(self, finals_only: bool) -> bool:
        if finals_only:
            return bool(self._queues[Priority.FINAL])
        return self.queue_depth > 0

    async def _lane(self, finals_only: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._work:
                await self._work.wait_for(lambda: self._has_work(finals_only))
            if self._config.max_wait_ms and self.queue_depth < self.max_batch > 1:
                # Give other calls' utterances that arrive in the same instant a chance to
                # share this forward; bounded so a lone utterance is barely delayed.
                await self.clock.sleep(self._config.max_wait_ms / 1000)
            batch = self._take_batch(finals_only)
            if batch:
                await self._run_batch(loop, batch)

    def _take_batch(self, finals_only: bool) -> list[_Job]:
        batch: list[_Job] = []
        now = self.clock.now()
        stale_after = self._config.interim_interval_ms / 1000
        for priority in (Priority.FINAL,) if finals_only else tuple(Priority):
            queue = self._queues[priority]
            while queue and len(batch) < self.max_batch:
                job = queue.popleft()
                if job.future.done():  # withdrawn: call ended, speculation voided
                    continue
                if priority is Priority.INTERIM and now - job.submitted > stale_after > 0:
                    self.skipped_interims += 1
                    job.future.set_exception(
                        EngineError("interim skipped: the engine is behind", "interim_skipped")
                    )
                    continue
                batch.append(job)
                if job.started is not None and not isinstance(self.engine, AsyncEngine):
                    job.started.set()
            if batch:
                break  # never mix interims into a batch of finals: finals return sooner
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        started = self.clock.now()
        requests = [job.request for job in batch]
        results: Sequence[EngineResult | BaseException]
        try:
            results = await self._call(requests)
            if len(results) != len(batch):
                raise EngineError(f"engine returned {len(results)} results for {len(batch)}")
        except EngineError as exc:
            if exc.code != "engine_timeout" and len(batch) > 1:
                results = await self._one_by_one(requests)
            else:
                results = [exc] * len(batch)  # a hung engine would hang again item by item
        except Exception as exc:
            results = [exc] if len(batch) == 1 else await self._one_by_one(requests)
        self._deliver(batch, results, started)

    def _deliver(
        self, batch: list[_Job], results: Sequence[EngineResult | BaseException], started: float
    ) -> None:
        """Hand each job its text or its error; count them (metrics)."""
        engine_ms = (self.clock.now() - started) * 1000
        if self.on_batch is not None:
            self.on_batch(batch[0].priority, len(batch), engine_ms / 1000)
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                self.failed += 1
                log.warning("engine failed an utterance: %r", result)
                code = result.code if isinstance(result, EngineError) else "engine_error"
                job.future.set_exception(EngineError(f"transcription failed: {result}", code))
                continue
            if job.priority is Priority.FINAL:
                self.completed += 1
            else:
                self.completed_interims += 1
            job.future.set_result(
                Transcription(
                    text=result.text,
                    language=result.language,
                    queue_ms=(started - job.submitted) * 1000,
                    engine_ms=engine_ms,
                    batch_size=len(batch),
                )
            )

    async def _one_by_one(
        self, requests: list[EngineRequest]
    ) -> list[EngineResult | BaseException]:
        """Retry a failed batch item by item so one bad utterance does not fail its neighbours."""
        results: list[EngineResult | BaseException] = []
        for request in requests:
            hung = [r for r in results if isinstance(r, EngineError) and r.code == "engine_timeout"]
            if hung:  # the engine hangs: do not feed it the rest one watchdog period each
                results.append(hung[0])
                continue
            try:
                (one,) = await self._call([request])
                results.append(one)
            except Exception as item_exc:
                results.append(item_exc)
        return results

    async def _call(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """One ``Engine.transcribe`` on the engine's threads, bounded by the watchdog."""
        assert isinstance(self.engine, Engine)
        executor = self._executor
        future = executor.submit(self.engine.transcribe, requests)
        try:
            return await wait_for(self.clock, asyncio.wrap_future(future), self._config.watchdog_s)
        except TimeoutError:
            self._abandon(executor, future)
            raise EngineError(
                f"the engine did not answer within {self._config.watchdog_s:g} s",
                "engine_timeout",
            ) from None

    def _abandon(
        self, executor: ThreadPoolExecutor, future: concurrent.futures.Future[list[EngineResult]]
    ) -> None:
        """Leave a hung call's threads behind and carry on with a fresh pool."""
        self.timeouts += 1
        if not future.done():
            self._hung.add(future)
            # Runs in the engine thread when (if ever) the hung call returns.
            future.add_done_callback(self._hung.discard)
        if executor is self._executor:
            log.error(
                "engine call hung for over %g s: its thread is abandoned, a new one serves",
                self._config.watchdog_s,
            )
            self._executor = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="engine")
            # The other lanes' calls on the old pool still finish; the pool then winds down.
            executor.shutdown(wait=False)

    # -- an AsyncEngine: requests on the event loop ---------------------------------------

    def _async_slots(self) -> int:
        """Requests the engine takes at once now (``AsyncEngine.slots`` may change while it
        runs; each finished request wakes the dispatcher, which reads it again)."""
        assert isinstance(self.engine, AsyncEngine)
        return max(1, self.engine.slots)

    def _async_finals_only(self) -> bool:
        """One slot is kept for finals (as lane 0 is on a threaded engine), so a final never
        waits for interims to come back."""
        slots = self._async_slots()
        return slots > 1 and len(self._requests) >= slots - 1

    def _may_start(self) -> bool:
        return len(self._requests) < self._async_slots() and self._has_work(
            self._async_finals_only()
        )

    async def _dispatch(self) -> None:
        """Start queued requests, best priority first, while a slot is free."""
        assert isinstance(self.engine, AsyncEngine)
        engine = self.engine
        while True:
            async with self._work:
                await self._work.wait_for(self._may_start)
            for job in self._take_batch(self._async_finals_only()):
                task = asyncio.create_task(self._run_request(engine, job), name="engine-request")
                self._requests[task] = job
                job.future.add_done_callback(_stop_if_withdrawn(task))

    async def _run_request(self, engine: AsyncEngine, job: _Job) -> None:
        started = self.clock.now()
        result: EngineResult | BaseException
        try:
            try:
                # The engine bounds its own requests; the watchdog is the backstop.
                async with asyncio.timeout(self._config.watchdog_s):
                    result = await engine.transcribe_one(job.request, job.priority)
            except TimeoutError:
                result = EngineError(
                    f"the engine did not answer within {self._config.watchdog_s:g} s",
                    "engine_timeout",
                )
            except Exception as exc:
                result = exc
            if isinstance(result, EngineError) and result.code == "engine_timeout":
                self.timeouts += 1
            self._deliver([job], [result], started)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._requests.pop(task, None)
            async with self._work:
                self._work.notify_all()  # a slot is free

    async def _close_async(self, engine: AsyncEngine) -> None:
        requests = dict(self._requests)
        for task in requests:
            task.cancel()
        for task, job in requests.items():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not job.future.done():
                job.future.set_exception(EngineError("server shutting down", "shutdown"))
        self._requests.clear()
        try:
            await asyncio.wait_for(engine.aclose(), self._config.watchdog_s)
        except TimeoutError:
            log.error("the engine did not close within %g s", self._config.watchdog_s)
        self._executor.shutdown(wait=False)


def _stop_if_withdrawn(
    task: asyncio.Task[None],
) -> Callable[[asyncio.Future[Transcription]], None]:
    """The caller withdrew the request (cancelled its await): cancel the request itself."""

    def stop(future: asyncio.Future[Transcription]) -> None:
        if future.cancelled():
            task.cancel()

    return stop

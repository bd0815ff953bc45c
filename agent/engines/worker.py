"""The engine worker: one thread that owns the engine, and the batching in front of it.

Every session submits utterances here. Requests that wait at the same moment are grouped
into one ``Engine.transcribe`` call (up to ``max_batch``, waiting at most ``max_wait_ms`` to
fill a batch), so a GPU engine decodes many calls in one forward. Finals are served before
interims. A batch that raises is retried item by item so one bad utterance fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum

from agent.config import EngineConfig
from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.errors import EngineError

log = logging.getLogger(__name__)


class Priority(IntEnum):
    FINAL = 0
    INTERIM = 1


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
    submitted: float = field(default_factory=time.perf_counter)


class EngineWorker:
    """Owns the engine, its thread and the batching task. Start once, share everywhere."""

    def __init__(
        self, engine: Engine, config: EngineConfig, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.engine = engine
        self._config = config
        self._queues: dict[Priority, deque[_Job]] = {p: deque() for p in Priority}
        self._wakeup = asyncio.Event()
        # One thread for the engine's whole life: load, warm-up and every batch run on it,
        # which keeps thread-bound state (CUDA streams, compiled graphs) in one place.
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task[None] | None = None
        self.skipped_interims = 0
        self.completed = 0

    @classmethod
    async def start(cls, config: EngineConfig, engine: Engine | None = None) -> EngineWorker:
        """Load (unless given) and warm up the engine in the worker thread, then serve."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        try:
            if engine is None:
                from agent.engines import create_engine

                engine = await loop.run_in_executor(executor, create_engine, config)
            await loop.run_in_executor(executor, engine.warmup)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        worker = cls(engine, config, executor)
        worker._task = asyncio.create_task(worker._serve(), name="engine-worker")
        return worker

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def transcribe(
        self, request: EngineRequest, priority: Priority = Priority.FINAL
    ) -> Transcription:
        """Queue one utterance and wait for its text. Raises ``EngineError`` on failure."""
        if self._task is None or self._task.done():
            raise EngineError("the engine is not running", code="engine_unavailable")
        if self.queue_depth >= self._config.max_queue:
            if priority is Priority.INTERIM:
                self.skipped_interims += 1
            raise EngineError("the engine queue is full", code="queue_full")
        job = _Job(request, asyncio.get_running_loop().create_future())
        self._queues[priority].append(job)
        self._wakeup.set()
        return await job.future

    async def close(self) -> None:
        """Stop serving, fail what still waits, release the engine and its thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for queue in self._queues.values():
            while queue:
                job = queue.popleft()
                if not job.future.done():
                    job.future.set_exception(EngineError("server shutting down", "shutdown"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.close)
        self._executor.shutdown(wait=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue_depth:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._config.max_wait_ms and self.queue_depth < self._config.max_batch:
                # Give other calls' utterances that arrive in the same instant a chance to
                # share this forward; bounded so a lone utterance is barely delayed.
                await asyncio.sleep(self._config.max_wait_ms / 1000)
            batch = self._take_batch()
            if batch:
                await self._run_batch(loop, batch)

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        for priority in Priority:  # finals first
            queue = self._queues[priority]
            while queue and len(batch) < self._config.max_batch:
                job = queue.popleft()
                if not job.future.done():  # the caller gave up (call ended, cancelled)
                    batch.append(job)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        started = time.perf_counter()
        requests = [job.request for job in batch]
        try:
            results: list[EngineResult | BaseException] = list(
                await loop.run_in_executor(self._executor, self.engine.transcribe, requests)
            )
            if len(results) != len(batch):
                raise EngineError(f"engine returned {len(results)} results for {len(batch)}")
        except Exception as exc:
            if len(batch) == 1:
                results = [exc]
            else:
                # Retry one by one so a single bad utterance does not fail its neighbours.
                results = []
                for request in requests:
                    try:
                        (one,) = await loop.run_in_executor(
                            self._executor, self.engine.transcribe, [request]
                        )
                        results.append(one)
                    except Exception as item_exc:
                        results.append(item_exc)
        engine_ms = (time.perf_counter() - started) * 1000
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                log.warning("engine failed an utterance: %r", result)
                code = result.code if isinstance(result, EngineError) else "engine_error"
                job.future.set_exception(EngineError(f"transcription failed: {result}", code))
                continue
            self.completed += 1
            job.future.set_result(
                Transcription(
                    text=result.text,
                    language=result.language,
                    queue_ms=(started - job.submitted) * 1000,
                    engine_ms=engine_ms,
                    batch_size=len(batch),
                )
            )

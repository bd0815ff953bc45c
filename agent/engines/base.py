"""The engine extension points: transcribe utterances, return their texts.

``Engine`` is synchronous and blocking; it is only ever called from the engine worker's
threads (``agent.engines.worker``), never from the event loop. ``AsyncEngine`` is for an
engine that only waits (on another server): it runs on the event loop, one coroutine per
utterance, and cancelling that coroutine really stops the work. The worker picks the path
by which of the two an engine is. One instance serves every call, so implementations must
not keep per-call state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000

Samples = npt.NDArray[np.float32]


class Priority(IntEnum):
    """Served in this order. Live finals first: a person is waiting for them; recorded-file
    pieces next; interims last (and skipped when stale).

    Part of an engine's contract because a remote engine passes it on: the server it calls
    (another voxtral-rtc) then queues the request as the gateway would have.
    """

    FINAL = 0
    FILE = 1
    INTERIM = 2


@dataclass(frozen=True, eq=False)
class EngineRequest:
    """One utterance to transcribe: 16 kHz mono float32 samples in [-1, 1]."""

    audio: Samples
    #: ISO 639-1 code, or ``None`` to let the engine decide (detect, or its only language).
    language: str | None = None
    #: Text that conditions the decoding (names, spelling); ``None`` for none.
    prompt: str | None = None

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class EngineResult:
    text: str
    language: str | None = None


class Engine(ABC):
    """Speech to text for batches of utterances."""

    #: Short name reported in ``session.created`` and ``/readyz``.
    name: str = "engine"
    #: How many ``transcribe`` calls this instance can run at once (from different threads).
    max_lanes: int = 1
    #: Largest batch decoded in one forward. An engine that loops over the items says 1:
    #: batching it would only make each item wait for the others.
    max_batch: int = 256

    @abstractmethod
    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        """Return one result per request, in order. Raise to fail the whole batch."""

    def warmup(self) -> None:
        """Run the compiled / cached paths once so the first real call is not slow."""
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(SAMPLE_RATE) * 0.01).astype(np.float32)
        self.transcribe([EngineRequest(noise)])

    def close(self) -> None:
        """Release model memory (called once at shutdown, in the worker thread)."""


class AsyncEngine(ABC):
    """Speech to text one utterance at a time, on the event loop (nothing here may block)."""

    #: Short name reported in ``session.created`` and ``/readyz``.
    name: str = "engine"
    #: Requests the worker lets run at once, at most; more wait in its queue, by priority.
    max_concurrency: int = 1

    @abstractmethod
    async def transcribe_one(self, request: EngineRequest, priority: Priority) -> EngineResult:
        """Return the request's text. Raise ``EngineError`` (with its wire code) to fail it.

        ``priority`` is the worker's queue the request came from, for an engine whose
        server queues requests too (it tells that server which ones a person waits for).

        The worker cancels this coroutine when the caller withdraws the utterance (a
        speculative final voided by more speech, a call that ended): it must then stop
        the work it started, not leave it running.
        """

    @property
    def slots(self) -> int:
        """Requests the worker lets run at once now. Read before every start, so an engine
        may change it while it runs (the servers behind it said how many requests they run
        at once, or one went out of service); ``max_concurrency`` unless it does."""
        return self.max_concurrency

    async def start(self) -> None:
        """Open connections before the first utterance (on the event loop)."""

    async def aclose(self) -> None:
        """Release connections and background tasks (called once at shutdown)."""

    @property
    def degraded(self) -> bool:
        """True while the engine cannot serve at all (its utterances fail at once)."""
        return False

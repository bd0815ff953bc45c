"""The engine extension point: transcribe a batch of utterances, return their texts.

An engine is synchronous and blocking; it is only ever called from the engine worker's
thread (``agent.engines.worker``), never from the event loop. One instance serves every
call, so implementations must not keep per-call state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000

Samples = npt.NDArray[np.float32]


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

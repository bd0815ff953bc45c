"""The engine extension points: transcribe utterances, return their texts.

``Engine`` is synchronous and blocking; it is only ever called from the engine worker's
threads (``agent.engines.worker``), never from the event loop. ``AsyncEngine`` is for an
engine that only waits (on another server): it runs on the event loop, one coroutine per
utterance, and cancelling that coroutine really stops the work. The worker picks the path
by which of the two an engine is. One instance serves every call, so implementations must
not keep per-call state.

``StreamingEngine`` is the third capability: a model that decodes audio as it arrives (one
text update per frame, at a fixed delay) rather than whole utterances. It owns its own thread
and its streams; a session talks to a stream directly, not through the worker's queue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from agent.errors import EngineError

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
class SpokenBefore:
    """The utterance said just before a request's on the same call, and its final text.

    An engine may decode the two together and keep only the new words: Whisper hears a
    short turn better after the one before it than alone (docs/benchmarks.md, issue 15).
    Engines that do not use it ignore it.
    """

    audio: Samples
    text: str
    #: The call's final texts before that one (the last few, oldest first, joined): Whisper
    #: is conditioned on them as faster-whisper conditions a window on the text before it.
    earlier: str = ""


@dataclass(frozen=True, eq=False)
class EngineRequest:
    """One utterance to transcribe: 16 kHz mono float32 samples in [-1, 1]."""

    audio: Samples
    #: ISO 639-1 code, or ``None`` to let the engine decide (detect, or its only language).
    language: str | None = None
    #: Text that conditions the decoding (names, spelling); ``None`` for none.
    prompt: str | None = None
    #: A hypothesis of open speech (an interim), not a final: an engine may trade accuracy
    #: for speed (the embedded engine decodes it greedily; the final corrects it anyway).
    draft: bool = False
    #: A live final's previous utterance, when the call has one (never for drafts or files).
    before: SpokenBefore | None = None

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


@dataclass(frozen=True)
class StreamText:
    """What a stream decoded for one frame of its audio: possibly no text at all.

    ``start_ms``/``end_ms`` are the stream's audio (since its first sample) that the text
    belongs to, not when it was decoded: a model with a delay emits the text of a frame
    once it has heard ``delay_ms`` more.
    """

    text: str
    start_ms: int
    end_ms: int
    #: Audio the stream holds that is complete but not decoded yet, in ms: more than one
    #: frame means the engine is behind real time for this stream.
    lag_ms: float = 0.0
    #: The last update of a flushed stream: every frame of its audio is decoded.
    done: bool = False
    #: Set (an error code) on a last update when the engine failed the stream: no more come.
    error: str | None = None


class EngineStream(ABC):
    """One open stream of 16 kHz audio. Every method is thread-safe and returns at once."""

    #: The model's delay for this stream: text for audio at ``t`` comes once ``t +
    #: delay_ms`` has been pushed.
    delay_ms: int

    @abstractmethod
    def push(self, samples: Samples) -> None:
        """Add audio, of any length (a sample or an hour)."""

    @abstractmethod
    def flush(self) -> None:
        """No more audio: decode what is pushed to the end, then send the ``done`` update."""

    @abstractmethod
    def close(self) -> None:
        """Leave now (whether flushed or not): no more updates, the slot is free."""


class StreamingEngine(Engine):
    """An engine that transcribes streams as they arrive (one text update per frame).

    It is also an ``Engine``: ``transcribe`` runs each utterance through a stream of its
    own (pushed whole, then flushed), so file transcription and the worker need nothing
    else. Sessions pick the streaming path by this capability.
    """

    #: Audio per decoded frame, and the delays a stream may ask for.
    frame_ms: int = 80
    min_delay_ms: int = 80
    max_delay_ms: int = 2400
    default_delay_ms: int = 480

    @abstractmethod
    def open_stream(
        self,
        on_update: Callable[[StreamText], None],
        language: str | None = None,
        delay_ms: int | None = None,
    ) -> EngineStream:
        """Open a stream; ``on_update`` is called on the engine's thread, in audio order.

        Raises ``EngineError`` (code ``too_many_calls``) when taking one more stream would
        make the open ones fall behind real time, or ``invalid_value`` for a bad delay.
        """

    def check_delay(self, delay_ms: int) -> None:
        """Raise ``EngineError`` (``invalid_value``) unless streams may use ``delay_ms``."""
        step = self.frame_ms
        if delay_ms % step or not self.min_delay_ms <= delay_ms <= self.max_delay_ms:
            raise EngineError(
                f"delay_ms must be a multiple of {step} in "
                f"[{self.min_delay_ms}, {self.max_delay_ms}], not {delay_ms}",
                "invalid_value",
            )

    @abstractmethod
    def admits(self) -> bool:
        """Whether a new stream would be accepted now (capacity, and keeping up)."""

    def lag_ms(self) -> float:
        """The most any open stream is behind real time, in ms (0 when keeping up)."""
        return 0.0

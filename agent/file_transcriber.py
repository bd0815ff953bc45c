"""Transcribe a whole decoded recording through the shared engine worker.

Shared by ``POST /v1/audio/transcriptions`` and ``voxtral-rtc transcribe``. Two stages:

- ``plan``: the VAD runs over the file in a thread executor (a minute of audio per call,
  so a long file never holds a thread for long and progress can be reported), then
  ``agent.chunking`` turns the probabilities into pieces of at most 30 s.
- ``segments``: pieces are submitted to ``EngineWorker.transcribe`` concurrently, so the
  worker batches them into one engine call, but at most ``max_in_flight`` at a time, so a
  three-hour file neither overflows the worker's queue nor starves live calls sharing the
  engine. Texts come back in audio order with their pieces' times.

With ``timestamps`` (verbose_json, srt, vtt) every speech region is its own request: the
engines return text without word times, so a region's VAD bounds are the only honest
per-phrase timestamps. Without it regions are packed up to 30 s, a few times faster.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.chunking import ChunkingOptions, Piece, plan_pieces, window_count
from agent.config import Config
from agent.engines.base import EngineRequest
from agent.engines.worker import EngineWorker, Priority, Transcription
from agent.vad import WINDOW_SAMPLES, Vad, VadStream

SAMPLE_RATE = 16_000
#: VAD windows per executor call: one minute of audio, about 0.25 s of Silero work.
_VAD_BATCH_WINDOWS = 1875

Samples = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TranscribeOptions:
    """What the caller asks of one file."""

    #: ISO 639-1 code, or ``None`` for the engine's default / detection.
    language: str | None = None
    #: Text conditioning every piece (names, spelling).
    prompt: str | None = None
    #: One piece per speech region (per-phrase times) rather than packed 30 s pieces.
    timestamps: bool = False
    #: The engine queue its pieces wait in: a gateway's utterance may ask for a live one.
    priority: Priority = Priority.FILE


@dataclass(frozen=True)
class Progress:
    """How far a file is: ``done`` of ``total`` audio seconds through ``stage``."""

    stage: Literal["vad", "transcribe"]
    done_s: float
    total_s: float


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Plan:
    """A file cut into pieces; ``duration_s`` is the whole file's length."""

    pieces: tuple[Piece, ...]
    duration_s: float


@dataclass(frozen=True)
class Segment:
    """One piece's text with its speech times (seconds from the start of the file)."""

    id: int
    start: float
    end: float
    text: str
    language: str | None
    #: 1 - mean VAD speech probability over the piece's speech.
    no_speech_prob: float


@dataclass(frozen=True)
class FileTranscript:
    text: str
    segments: tuple[Segment, ...]
    duration_s: float
    language: str | None


class FileTranscriber:
    """Cuts one recording into pieces and transcribes them; one instance may serve many."""

    def __init__(
        self,
        worker: EngineWorker,
        vad: Vad,
        chunking: ChunkingOptions,
        executor: Executor,
        max_in_flight: int,
    ) -> None:
        self._worker = worker
        self._vad = vad
        self._chunking = chunking
        self._executor = executor
        self._max_in_flight = max(max_in_flight, 1)

    @classmethod
    def from_config(
        cls, worker: EngineWorker, vad: Vad, config: Config, executor: Executor
    ) -> FileTranscriber:
        """Cut like the live path (its VAD and segmenter settings); keep at most one engine
        batch of pieces in flight per file."""
        chunking = ChunkingOptions.from_config(config.vad, config.segmenter)
        return cls(worker, vad, chunking, executor, max_in_flight=config.engine.max_batch)

    async def plan(
        self,
        audio: Samples,
        options: TranscribeOptions,
        on_progress: ProgressCallback | None = None,
    ) -> Plan:
        """Run the VAD over ``audio`` (16 kHz mono) off the loop and cut it into pieces."""
        loop = asyncio.get_running_loop()
        stream = self._vad.stream()
        n_windows = window_count(len(audio))
        probs = np.zeros(n_windows, dtype=np.float32)
        duration = len(audio) / SAMPLE_RATE
        for lo in range(0, n_windows, _VAD_BATCH_WINDOWS):
            hi = min(lo + _VAD_BATCH_WINDOWS, n_windows)
            probs[lo:hi] = await loop.run_in_executor(
                self._executor, _probabilities, stream, audio, lo, hi
            )
            if on_progress is not None:
                done = min(hi * WINDOW_SAMPLES / SAMPLE_RATE, duration)
                on_progress(Progress("vad", done, duration))
        chunking = dataclasses.replace(self._chunking, pack=not options.timestamps)
        pieces = await loop.run_in_executor(
            self._executor, plan_pieces, probs, len(audio), chunking
        )
        return Plan(tuple(pieces), duration)

    async def segments(
        self,
        audio: Samples,
        plan: Plan,
        options: TranscribeOptions,
        on_progress: ProgressCallback | None = None,
    ) -> AsyncGenerator[Segment, None]:
        """Transcribe the plan's pieces; yields their segments in audio order.

        Pieces whose text is empty (noise the VAD took for speech) yield nothing. Raises
        ``EngineError`` if a piece fails; the pieces still queued are then cancelled.
        """
        pending: deque[tuple[Piece, asyncio.Task[Transcription]]] = deque()
        upcoming = iter(plan.pieces)
        next_id = 0
        try:
            while True:
                while len(pending) < self._max_in_flight:
                    piece = next(upcoming, None)
                    if piece is None:
                        break
                    pending.append((piece, self._submit(audio, piece, options)))
                if not pending:
                    break
                piece, task = pending.popleft()
                result = await task
                if on_progress is not None:
                    on_progress(Progress("transcribe", piece.end_s, plan.duration_s))
                text = result.text.strip()
                if text:
                    yield Segment(
                        id=next_id,
                        start=round(piece.start_s, 3),
                        end=round(piece.end_s, 3),
                        text=text,
                        language=result.language,
                        no_speech_prob=round(1.0 - piece.speech_prob, 4),
                    )
                    next_id += 1
            if on_progress is not None:  # the tail after the last speech is done too
                on_progress(Progress("transcribe", plan.duration_s, plan.duration_s))
        finally:
            for _, task in pending:
                task.cancel()
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)

    async def transcribe(
        self,
        audio: Samples,
        options: TranscribeOptions,
        on_progress: ProgressCallback | None = None,
    ) -> FileTranscript:
        """Plan and transcribe ``audio`` in one go."""
        plan = await self.plan(audio, options, on_progress)
        return await self.collect(audio, plan, options, on_progress)

    async def collect(
        self,
        audio: Samples,
        plan: Plan,
        options: TranscribeOptions,
        on_progress: ProgressCallback | None = None,
    ) -> FileTranscript:
        """Transcribe an existing plan into one ``FileTranscript``."""
        found = [s async for s in self.segments(audio, plan, options, on_progress)]
        return stitch(found, plan.duration_s, options.language)

    def _submit(
        self, audio: Samples, piece: Piece, options: TranscribeOptions
    ) -> asyncio.Task[Transcription]:
        request = EngineRequest(
            audio=audio[piece.audio_start : piece.audio_end],
            language=options.language,
            prompt=options.prompt,
        )
        return asyncio.create_task(
            self._worker.transcribe(request, options.priority), name=f"file-piece-{piece.index}"
        )


def stitch(
    segments: list[Segment], duration_s: float, language: str | None = None
) -> FileTranscript:
    """Join segments (already in audio order) into the file's transcript."""
    detected = next((s.language for s in segments if s.language), None)
    return FileTranscript(
        text=" ".join(s.text for s in segments),
        segments=tuple(segments),
        duration_s=round(duration_s, 3),
        language=language or detected,
    )


def _probabilities(stream: VadStream, audio: Samples, lo: int, hi: int) -> Samples:
    """Speech probabilities of windows ``lo..hi`` (the last window zero-padded)."""
    out = np.empty(hi - lo, dtype=np.float32)
    for i in range(lo, hi):
        window = audio[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
        if len(window) < WINDOW_SAMPLES:
            window = np.pad(window, (0, WINDOW_SAMPLES - len(window)))
        out[i - lo] = stream.probability(np.ascontiguousarray(window, dtype=np.float32))
    return out

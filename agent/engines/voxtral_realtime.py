"""The Voxtral Realtime engine: Mistral's streaming model, every open stream in one forward.

One thread owns the model. It waits until some stream has its next 80 ms frame (or a new
stream its first chunk), then runs: a prefill for the streams that start (grouped by delay),
and one batched ``step`` for every stream whose next frame is in (``voxtral_realtime_step``).
Streams join and leave at any step; each keeps its own conv state, encoder and decoder
rings and positions in a slot. Every token goes back to its stream's ``on_update`` (called
on this thread) with the audio time it belongs to.

Behind real time: a step that takes longer than a frame (80 ms) while streams are live
leaves audio waiting; ``StreamText.lag_ms`` says how much, per stream. New streams are
refused (``too_many_calls``) at ``engine.max_streams``, and once the recent steps took more
than ``admit_step_fraction`` of a frame, so the open ones keep up rather than all falling
behind together.

fp32 on a CPU (tests), bf16 on CUDA. ``engine.compile`` (off by default) compiles the step
once per batch-size bucket (powers of two up to ``engine.max_streams``, and it), every bucket
in ``warmup()`` on the engine thread, so serving never compiles: a step over 3 slots runs in
the bucket of 4 with an idle row. On a CPU that is inductor's C++ (tested); on CUDA it is
CUDA graphs (``reduce-overhead``), written but not yet run on a GPU. Language: the model
detects it; ``language`` is accepted and not used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import EngineConfig
from agent.engines.base import (
    SAMPLE_RATE,
    EngineRequest,
    EngineResult,
    EngineStream,
    Samples,
    StreamingEngine,
    StreamText,
)
from agent.errors import EngineError, EngineLoadError

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the installed extra
    raise EngineLoadError(
        f"engine.kind voxtral_realtime needs PyTorch ({exc}): pip install 'voxtral-rtc[voxtral]'"
    ) from exc

from agent.engines.voxtral_load import cudagraph_thread_state, pick_device
from agent.engines.voxtral_realtime_load import load_realtime_model
from agent.engines.voxtral_realtime_step import BatchedRealtime
from agent.engines.voxtral_realtime_streams import (
    CHUNK_SAMPLES,
    LEFT_PAD_TOKENS,
    StreamAudio,
    TokenText,
)

log = logging.getLogger(__name__)

FRAME_MS = 80
#: A stream's latest tokens kept for inspection (10 minutes of audio).
TOKENS_KEPT = 7500
#: A file piece waits this long for a free stream slot before it fails.
FILE_SLOT_WAIT_S = 60.0


@dataclass(frozen=True)
class RealtimeOptions:
    """Knobs of the engine that ``engine:`` in config.yaml does not carry."""

    #: Decoder keys/values kept per stream, in tokens; 0: the model's sliding window (8192
    #: for the 4 B model, 872 MB per stream in bf16). Less holds more streams per GPU but
    #: forgets context sooner than the model was trained for.
    decoder_context: int = 0
    #: Refuse new streams once the recent steps took more than this share of a frame.
    admit_step_fraction: float = 0.75
    #: Row counts ``engine.compile`` compiles the step for (``engine.max_streams`` is always
    #: one); empty: the powers of two up to it. Fewer buckets compile sooner and pad more.
    batch_buckets: tuple[int, ...] = ()


class _Stream(EngineStream):
    def __init__(
        self,
        engine: VoxtralRealtimeEngine,
        slot: int,
        delay_ms: int,
        on_update: Callable[[StreamText], None],
        text: TokenText,
    ) -> None:
        self._engine = engine
        self.slot = slot
        self.delay_ms = delay_ms
        self.delay_tokens = delay_ms // FRAME_MS
        self.on_update = on_update
        self.audio = StreamAudio(self.delay_tokens)
        self.text = text
        self.last_token = 0
        #: Every token decoded, in order (what tests compare with transformers' generate).
        self.token_ids: deque[int] = deque(maxlen=TOKENS_KEPT)
        self.closed = False
        self.done_sent = False

    def push(self, samples: Samples) -> None:
        with self._engine._cond:
            self.audio.push(samples)
            if self.audio.ready():
                self._engine._cond.notify()

    def flush(self) -> None:
        with self._engine._cond:
            self.audio.flush()
            self._engine._cond.notify()

    def close(self) -> None:
        self._engine._release(self)


class VoxtralRealtimeEngine(StreamingEngine):
    """Voxtral Realtime behind ``StreamingEngine``. Pass ``model``/``processor`` to skip
    loading (tests, benchmarks)."""

    name = "voxtral_realtime"
    max_lanes = 1

    def __init__(
        self,
        config: EngineConfig,
        options: RealtimeOptions | None = None,
        *,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        self._options = options or RealtimeOptions()
        self.default_delay_ms = config.delay_ms
        self.max_streams = config.max_streams
        self.max_batch = min(config.max_batch, config.max_streams)
        if model is None:
            device = pick_device(config.device)
            model, processor = load_realtime_model(config.model, device)
        self._model = model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._batch = BatchedRealtime(
            model,
            processor.feature_extractor,
            config.max_streams,
            self._options.decoder_context,
            compile=config.compile,
            buckets=self._options.batch_buckets,
        )
        self._step = self._batch.step
        self._bos = int(self._tokenizer.bos_token_id)
        self._pad = int(self._tokenizer.convert_tokens_to_ids("[STREAMING_PAD]"))
        self._cond = threading.Condition()
        self._streams: dict[int, _Stream] = {}
        self._free = list(range(config.max_streams))
        self._stop = False
        #: Calls to run on the engine thread between steps (warm-up), with their futures.
        self._calls: deque[tuple[Callable[[], None], Future[None]]] = deque()
        #: Recent step time (exponential average) of steps with live streams, in seconds.
        self.step_s = 0.0
        self.steps = 0
        self.last_step_rows = 0
        #: How many steps stepped how many streams at once (tests, benchmarks), and how many
        #: of them stepped (streams, rows): rows is the bucket when compiled.
        self.step_sizes: Counter[int] = Counter()
        self.step_shapes: Counter[tuple[int, int]] = Counter()
        self._thread = threading.Thread(target=self._run, name="voxtral-realtime", daemon=True)
        self._thread.start()

    # -- the StreamingEngine surface ----------------------------------------------------

    def open_stream(
        self,
        on_update: Callable[[StreamText], None],
        language: str | None = None,
        delay_ms: int | None = None,
    ) -> EngineStream:
        delay = self.default_delay_ms if delay_ms is None else delay_ms
        self.check_delay(delay)
        with self._cond:
            if not self._admits_locked():
                raise EngineError(
                    f"the engine holds {len(self._streams)} streams and keeps up with no more",
                    "too_many_calls",
                )
            return self._open_locked(on_update, delay)

    def admits(self) -> bool:
        with self._cond:
            return self._admits_locked()

    def lag_ms(self) -> float:
        with self._cond:
            return max((s.audio.backlog_ms() for s in self._streams.values()), default=0.0)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _admits_locked(self) -> bool:
        if not self._free or self._stop:
            return False
        return self.step_s * 1000 <= self._options.admit_step_fraction * FRAME_MS

    def _open_locked(self, on_update: Callable[[StreamText], None], delay: int) -> _Stream:
        slot = min(self._free)  # lowest first: the stepped slot range stays compact
        self._free.remove(slot)
        stream = _Stream(self, slot, delay, on_update, TokenText(self._tokenizer))
        self._streams[slot] = stream
        return stream

    def _release(self, stream: _Stream) -> None:
        with self._cond:
            if stream.closed:
                return
            stream.closed = True
            if self._streams.get(stream.slot) is stream:
                del self._streams[stream.slot]
                self._free.append(stream.slot)
            if not self._streams:
                self.step_s = 0.0  # nothing open: the next stream starts from a clean slate
            self._cond.notify_all()

    # -- whole utterances (files, warm-up) -------------------------------------------------

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        """Each utterance through a stream of its own, pushed whole and flushed."""
        results: list[list[str]] = [[] for _ in batch]
        done = [threading.Event() for _ in batch]
        streams: list[EngineStream] = []

        def collect(i: int) -> Callable[[StreamText], None]:
            def on_update(update: StreamText) -> None:
                results[i].append(update.text)
                if update.done:
                    done[i].set()

            return on_update

        try:
            for i, request in enumerate(batch):
                stream = self._open_for_file(collect(i))
                streams.append(stream)
                stream.push(request.audio)
                stream.flush()
            for event in done:
                if not event.wait(FILE_SLOT_WAIT_S + 60 * len(batch)):
                    raise EngineError("the stream did not finish", "engine_timeout")
        finally:
            for stream in streams:
                stream.close()
        return [EngineResult("".join(parts).strip()) for parts in results]

    def _open_for_file(self, on_update: Callable[[StreamText], None]) -> EngineStream:
        """A file piece waits for a free slot (it has no caller waiting in real time)."""
        deadline = time.monotonic() + FILE_SLOT_WAIT_S
        with self._cond:
            while not self._free:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    raise EngineError("no free stream for the file", "too_many_calls")
                self._cond.wait(left)
            return self._open_locked(on_update, self.default_delay_ms)

    def warmup(self) -> None:
        """Compile every bucket's step (when compiled), then two utterances end to end."""
        if self._batch.compiled:
            started = time.perf_counter()
            self._on_engine_thread(self._warm_buckets)
            log.info(
                "Voxtral Realtime step compiled for %s rows in %.1f s",
                self._batch.buckets,
                time.perf_counter() - started,
            )
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(SAMPLE_RATE) * 0.01).astype(np.float32)
        self.transcribe([EngineRequest(noise), EngineRequest(noise[: SAMPLE_RATE // 2])])

    def _warm_buckets(self) -> None:
        for bucket in self._batch.buckets:
            try:
                self._batch.warm(bucket)
            except Exception as exc:
                raise EngineLoadError(
                    f"Voxtral Realtime warm-up failed at {bucket} rows: {exc}; lower "
                    "engine.max_streams if the GPU is out of memory, or set engine.compile: false"
                ) from exc

    def _on_engine_thread(self, call: Callable[[], None]) -> None:
        # CUDA graphs belong to the thread that recorded them (cudagraph trees are
        # thread-local): the warm-up must run where the steps will.
        done: Future[None] = Future()
        with self._cond:
            if self._stop:
                raise EngineError("the engine is closed")
            self._calls.append((call, done))
            self._cond.notify_all()
        done.result()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        if self._batch.compiled and self._batch.device.type == "cuda":
            try:
                cudagraph_thread_state()
            except Exception:  # the warm-up then fails and says why; this thread must live
                log.exception("could not set up CUDA-graph state on the engine's thread")
        while True:
            with self._cond:
                while not self._stop and not self._calls and not self._work_locked():
                    self._cond.wait()
                if self._stop:
                    for _, waiting in self._calls:
                        waiting.set_exception(EngineError("the engine is closed"))
                    return
                if self._calls:
                    call: tuple[Callable[[], None], Future[None]] | None = self._calls.popleft()
                else:
                    call = None
                    starting = [s for s in self._streams.values() if s.audio.tokens == 0]
                    starting = [s for s in starting if s.audio.ready()]
                    stepping = [s for s in self._streams.values() if s.audio.tokens > 0]
                    stepping = [s for s in stepping if s.audio.ready()]
                    firsts = [s.audio.take_first() for s in starting]
                    chunks = [s.audio.take_next() for s in stepping]
                    finished = [
                        s
                        for s in self._streams.values()
                        if s.audio.finished and not s.done_sent and s not in stepping
                    ]
            if call is not None:
                function, done = call
                try:
                    function()
                except Exception as exc:  # the caller waiting on it raises it
                    done.set_exception(exc)
                else:
                    done.set_result(None)
                continue
            self._round(starting, firsts, stepping, chunks, finished)

    def _round(
        self,
        starting: list[_Stream],
        firsts: list[Samples],
        stepping: list[_Stream],
        chunks: list[Samples],
        finished: list[_Stream],
    ) -> None:
        """Prefill the streams that start, step the others, send their tokens."""
        try:
            updates = self._prefill(starting, firsts) + self._step_all(stepping, chunks)
        except Exception:
            # Not retried: the rows' rings may be half written. Each stream gets a last
            # update saying so (its session fails its open items), then its slot is freed.
            log.exception("Voxtral Realtime step failed: its streams are closed")
            for stream in [*starting, *stepping]:
                end = stream.audio.tokens * FRAME_MS
                if not stream.closed:
                    stream.on_update(StreamText("", end, end, done=True, error="engine_error"))
                stream.done_sent = True
                self._release(stream)
            return
        for stream, update in updates:
            if not stream.closed:
                stream.on_update(update)
        for stream in finished:
            self._finish(stream)
        for stream in stepping:
            if stream.audio.finished:
                self._finish(stream)

    def _work_locked(self) -> bool:
        return any(
            s.audio.ready() or (s.audio.finished and not s.done_sent)
            for s in self._streams.values()
        )

    def _finish(self, stream: _Stream) -> None:
        stream.done_sent = True
        if not stream.closed:
            tail = stream.text.finish()
            end = stream.audio.tokens * FRAME_MS
            stream.on_update(StreamText(tail, end, end, done=True))

    def _prefill(
        self, streams: list[_Stream], audio: list[Samples]
    ) -> list[tuple[_Stream, StreamText]]:
        updates: list[tuple[_Stream, StreamText]] = []
        for delay in sorted({s.delay_tokens for s in streams}):
            group = [(s, a) for s, a in zip(streams, audio, strict=True) if s.delay_tokens == delay]
            prompt = [self._bos] + [self._pad] * (LEFT_PAD_TOKENS + delay)
            tokens = self._batch.prefill(
                [s.slot for s, _ in group],
                torch.from_numpy(np.stack([a for _, a in group])),
                torch.tensor([prompt] * len(group)),
                delay,
            ).tolist()
            for (stream, _), token in zip(group, tokens, strict=True):
                stream.last_token = int(token)
                updates.append((stream, self._update(stream, int(token), 0)))
        return updates

    def _step_all(
        self, streams: list[_Stream], chunks: list[Samples]
    ) -> list[tuple[_Stream, StreamText]]:
        if not streams:
            return []
        started = time.perf_counter()
        rows = max(s.slot for s in streams) + 1
        active = torch.zeros(rows, dtype=torch.bool)
        audio = torch.zeros(rows, CHUNK_SAMPLES)
        tokens = torch.zeros(rows, dtype=torch.long)
        enc_pos = torch.zeros(rows, dtype=torch.long)
        dec_pos = torch.zeros(rows, dtype=torch.long)
        delays = torch.zeros(rows, dtype=torch.long)
        prompt_tokens = {s.slot: LEFT_PAD_TOKENS + s.delay_tokens + 1 for s in streams}
        for stream, chunk in zip(streams, chunks, strict=True):
            slot = stream.slot
            active[slot] = True
            audio[slot] = torch.from_numpy(chunk)
            tokens[slot] = stream.last_token
            # Token k >= 1 is decoded at decoder position prompt + k - 1, encoder 4x that.
            position = prompt_tokens[slot] + stream.audio.tokens - 2
            dec_pos[slot] = position
            enc_pos[slot] = position * self._batch.downsample
            delays[slot] = stream.delay_tokens
        next_tokens = self._step(active, audio, tokens, enc_pos, dec_pos, delays).tolist()
        updates = []
        for stream in streams:
            token = int(next_tokens[stream.slot])
            stream.last_token = token
            updates.append((stream, self._update(stream, token, stream.audio.tokens - 1)))
        elapsed = time.perf_counter() - started
        if any(not s.audio.flushed for s in streams):  # live streams: real time matters
            self.step_s = elapsed if self.steps == 0 else 0.8 * self.step_s + 0.2 * elapsed
        self.steps += 1
        self.last_step_rows = self._batch.bucket(rows) if self._batch.compiled else rows
        self.step_sizes[len(streams)] += 1
        self.step_shapes[len(streams), self.last_step_rows] += 1
        return updates

    def _update(self, stream: _Stream, token: int, index: int) -> StreamText:
        stream.token_ids.append(token)
        return StreamText(
            stream.text.add(token),
            index * FRAME_MS,
            (index + 1) * FRAME_MS,
            lag_ms=stream.audio.backlog_ms(),
        )

"""The Voxtral engine: Mistral's Voxtral through ``transformers``, batched, on a GPU.

One ``transcribe`` call is one batched forward for every utterance the worker grouped:
log-mel on the model's device (``voxtral_features.LogMel``), the audio encoder, one prefill
of the left-padded prompts, then a greedy (or sampled) decode loop over a static KV cache.
The decode step, where nearly all the time goes, is ``torch.compile``d once per batch-size
bucket (powers of two up to ``engine.max_batch``) and every bucket is compiled and run in
``warmup()``, so serving never compiles: a batch of 3 runs in the bucket of 4 with one idle
row. Log-mel, encoder and prefill stay eager: they run once per batch and their shapes vary.

Prompts follow mistral-common's ``TranscriptionRequest``: ``lang:xx`` only when a language is
known (request, else ``engine.language``), auto-detection otherwise. ``EngineRequest.prompt``
is ignored: Voxtral's transcription mode has no slot for a text prompt.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import numpy as np

from agent.config import EngineConfig
from agent.engines.base import SAMPLE_RATE, Engine, EngineRequest, EngineResult
from agent.errors import EngineError, EngineLoadError

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the installed extra
    raise EngineLoadError(
        f"engine.kind voxtral needs PyTorch ({exc}): pip install 'voxtral-rtc[voxtral]'"
    ) from exc

from agent.engines.voxtral_features import (
    LogMel,
    Prompt,
    TranscriptionPrompts,
    batch_buckets,
    check_batch,
    max_new_tokens,
)
from agent.engines.voxtral_load import (
    DEFAULT_MODEL,
    check_transformers,
    compile_step,
    cudagraph_thread_state,
    load_model,
    pick_device,
    static_cache,
)

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: Text tokens a prompt may have beyond the language-less one (``lang:xx`` takes 2–4).
_PROMPT_RESERVE = 32


@dataclass(frozen=True)
class VoxtralOptions:
    """Knobs of the Voxtral engine that ``engine:`` in config.yaml does not carry."""

    #: Compile the decode step; ``None`` means on CUDA only (on a CPU it costs ~40 s+).
    compile: bool | None = None
    #: ``reduce-overhead`` replays CUDA graphs: a 30-layer step is launch-bound otherwise.
    compile_mode: str = "reduce-overhead"
    #: Batch sizes compiled; empty means powers of two up to ``engine.max_batch`` (and it).
    batch_buckets: tuple[int, ...] = ()
    #: New-token bound: ``ceil(tokens_per_second × seconds) + token_margin``, at most the cap.
    tokens_per_second: float = 8.0
    token_margin: int = 16
    max_new_tokens: int = 256


@dataclass(frozen=True)
class StageTimings:
    """Where the time of one batched call went (milliseconds; GPU-synchronised)."""

    batch_size: int
    bucket: int
    logmel_ms: float
    encoder_ms: float
    prefill_ms: float
    decode_ms: float
    #: Decode-loop steps (tokens after the first, which the prefill produces).
    decode_steps: int

    @property
    def total_ms(self) -> float:
        return self.logmel_ms + self.encoder_ms + self.prefill_ms + self.decode_ms

    @property
    def per_token_ms(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else 0.0


class VoxtralEngine(Engine):
    """Voxtral behind ``Engine.transcribe``. Pass ``model``/``processor`` to skip loading."""

    name = "voxtral"

    def __init__(
        self,
        config: EngineConfig,
        options: VoxtralOptions | None = None,
        *,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        self._config = config
        self._options = options or VoxtralOptions()
        check_transformers()
        if model is None or processor is None:
            device = pick_device(config.device)
            model, processor = load_model(config.model or DEFAULT_MODEL, device)
        self._model: Any = model.eval()
        self._device: torch.device = next(model.parameters()).device
        self._audio_token_id = int(model.config.audio_token_id)
        self._eos_id = int(processor.tokenizer.eos_token_id)
        self._tokenizer: Any = processor.tokenizer
        self._mel = LogMel(processor.feature_extractor.mel_filters, self._device)
        self._prompts = TranscriptionPrompts(processor.tokenizer.tokenizer, self._audio_token_id)
        buckets = self._options.batch_buckets or batch_buckets(config.max_batch)
        self._buckets = tuple(sorted(set(buckets)))
        longest = len(self._prompts.get(None)) + _PROMPT_RESERVE + self._options.max_new_tokens
        self._cache_len = 64 * math.ceil(longest / 64)
        self._caches: dict[int, Any] = {}
        self._thread_ident: int | None = None
        self._thread = ThreadPoolExecutor(1, "voxtral", initializer=self._remember_thread)
        use_compile = self._options.compile
        self.compiled = self._device.type == "cuda" if use_compile is None else use_compile
        self._step: Callable[..., torch.Tensor] = self._decode_step
        if self.compiled:
            mode = self._options.compile_mode if self._device.type == "cuda" else "default"
            self._step = compile_step(self._decode_step, mode, graphs=len(self._buckets))
        log.info(
            "Voxtral on %s, buckets %s, KV cache %d tokens, compiled: %s",
            self._device, self._buckets, self._cache_len, self.compiled,
        )  # fmt: skip

    @property
    def buckets(self) -> tuple[int, ...]:
        """Batch sizes the decode step runs at (compiled for each when ``compiled``)."""
        return self._buckets

    # -- the Engine interface ------------------------------------------------------------

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        results: list[EngineResult] = []
        largest = self._buckets[-1]
        for start in range(0, len(batch), largest):
            chunk = batch[start : start + largest]
            results += self.transcribe_timed(chunk, synchronize=False)[0]
        return results

    def warmup(self) -> None:
        """Allocate every bucket's KV cache and compile + capture its decode step now."""
        self._on_thread(self._warmup)

    def close(self) -> None:
        self._on_thread(self._close)
        self._thread.shutdown(wait=True)

    def transcribe_timed(
        self,
        batch: Sequence[EngineRequest],
        *,
        force_new_tokens: int | None = None,
        synchronize: bool = True,
    ) -> tuple[list[EngineResult], StageTimings]:
        """Transcribe at most the largest bucket of utterances in one forward, timed by stage.

        ``force_new_tokens`` decodes exactly that many tokens per item, ignoring end of text
        (benchmarks of random weights, warm-up). ``synchronize`` waits for the GPU between
        stages so each stage's time is its own; serving skips that (the decode time then
        absorbs what is still queued). Raises ``EngineError`` naming the bad items.
        """
        return self._on_thread(self._transcribe_timed, batch, force_new_tokens, synchronize)

    def _on_thread(self, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        # CUDA graphs belong to the thread that recorded them (cudagraph trees are
        # thread-local): a call from another thread would record them all again. So every
        # model call runs on this engine's one thread, whichever thread the caller is on.
        if threading.get_ident() == self._thread_ident:
            return fn(*args, **kwargs)
        return self._thread.submit(fn, *args, **kwargs).result()

    def _remember_thread(self) -> None:
        # The pool starts its thread at the first call, after __init__ set `compiled`.
        self._thread_ident = threading.get_ident()
        if self.compiled and self._device.type == "cuda":
            try:
                cudagraph_thread_state()
            except Exception:  # an initializer that raises breaks the pool: log it instead
                log.exception("could not set up CUDA-graph state on the engine's thread")

    # -- on the engine's thread ----------------------------------------------------------

    def _warmup(self) -> None:
        rng = np.random.default_rng(0)
        noise = [(rng.standard_normal(SAMPLE_RATE) * 0.01).astype(np.float32) for _ in range(2)]
        for bucket in self._buckets if self.compiled else self._buckets[:1]:
            batch = [EngineRequest(noise[i % 2]) for i in range(bucket)]
            try:
                # Several decode steps: CUDA graphs are recorded on a graph's second call.
                self.transcribe_timed(batch, force_new_tokens=4)
            except EngineError as exc:
                raise EngineLoadError(
                    f"Voxtral warm-up failed at batch size {bucket}: {exc}; "
                    "lower engine.max_batch if the GPU is out of memory"
                ) from exc

    def _close(self) -> None:
        self._caches.clear()
        self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _transcribe_timed(
        self, batch: Sequence[EngineRequest], force_new_tokens: int | None, synchronize: bool
    ) -> tuple[list[EngineResult], StageTimings]:
        if not batch:
            return [], StageTimings(0, 0, 0.0, 0.0, 0.0, 0.0, 0)
        if len(batch) > self._buckets[-1]:
            raise ValueError(f"batch of {len(batch)} exceeds the largest bucket")
        prompts = check_batch(batch, self._prompts, self._config.language or None)
        try:
            with torch.no_grad():
                return self._run(batch, prompts, force_new_tokens, synchronize)
        except torch.OutOfMemoryError as exc:
            self._reset_caches()
            torch.cuda.empty_cache()
            raise EngineError(
                f"out of GPU memory transcribing {len(batch)} utterances", "engine_oom"
            ) from exc
        except Exception as exc:
            self._reset_caches()
            raise EngineError(f"Voxtral failed: {type(exc).__name__}: {exc}") from exc

    def _reset_caches(self) -> None:
        # Zeroed in place, never replaced: the compiled steps are bound to these tensors
        # (new ones would recompile), and a failed call may have left NaN in them, which
        # would leak through the mask (0 × NaN) into later calls.
        for cache in self._caches.values():
            cache.reset()

    def _run(
        self,
        batch: Sequence[EngineRequest],
        prompts: list[Prompt],
        force: int | None,
        synchronize: bool,
    ) -> tuple[list[EngineResult], StageTimings]:
        n = len(batch)
        bucket = next(b for b in self._buckets if b >= n)
        marks = [self._now(synchronize)]
        features = self._mel([request.audio for request in batch])
        marks.append(self._now(synchronize))
        dtype = self._model.dtype
        audio_embeds = self._model.get_audio_features(features.to(dtype)).pooler_output
        marks.append(self._now(synchronize))

        # Left padding: every prompt ends at the same column, so one cache slot per step.
        width = max(len(p) for p in prompts)
        pads = torch.tensor([width - len(p) for p in prompts], device=self._device)
        ids = torch.full((n, width), self._eos_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt.ids)
        ids = ids.to(self._device)
        embeds = self._model.get_input_embeddings()(ids)
        audio_slots = (ids == self._audio_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(audio_slots, audio_embeds.to(embeds.dtype))
        columns = torch.arange(width, device=self._device)
        real = columns[None, :] >= pads[:, None]  # (n, width): False on padding
        causal = columns[:, None] >= columns[None, :]
        # Padding queries see only padding, never nothing: a fully masked row would be NaN.
        mask = causal[None] & (real[:, None, :] | ~real[:, :, None])
        out = self._model(
            inputs_embeds=embeds,
            attention_mask=mask[:, None],
            position_ids=(columns[None, :] - pads[:, None]).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = self._cache(bucket)
        for static, prefilled in zip(cache.layers, out.past_key_values.layers, strict=True):
            static.keys[:n, :, :width].copy_(prefilled.keys)
            static.values[:n, :, :width].copy_(prefilled.values)
            static.cumulative_length.fill_(width)
        first = self._select(out.logits[:, -1])
        marks.append(self._now(synchronize))

        limits = [
            force
            or max_new_tokens(
                request.duration_s,
                per_second=self._options.tokens_per_second,
                margin=self._options.token_margin,
                cap=self._options.max_new_tokens,
            )
            for request in batch
        ]
        limits = [min(limit, self._cache_len - width) for limit in limits]
        tokens = self._decode(cache, bucket, first, pads, width, limits, force is not None)
        marks.append(self._now(synchronize))  # the decode loop ends on a host copy anyway

        results = []
        for row, prompt in enumerate(prompts):
            kept = tokens[row, : limits[row]].tolist()
            if force is None and self._eos_id in kept:
                kept = kept[: kept.index(self._eos_id)]
            text = self._tokenizer.decode(kept, skip_special_tokens=True).strip()
            results.append(EngineResult(text=text, language=prompt.language))
        logmel, encoder, prefill, decode = [(b - a) * 1000 for a, b in itertools.pairwise(marks)]
        timings = StageTimings(
            n, bucket, logmel, encoder, prefill, decode, decode_steps=tokens.shape[1] - 1
        )
        return results, timings

    def _decode(
        self,
        cache: Any,
        bucket: int,
        first: torch.Tensor,
        pads: torch.Tensor,
        width: int,
        limits: list[int],
        forced: bool,
    ) -> torch.Tensor:
        """Run the decode loop; return the generated ids ``(n, steps + 1)``."""
        n, device = len(limits), self._device
        slots = torch.arange(self._cache_len, device=device)
        key_valid = torch.zeros(bucket, self._cache_len, dtype=torch.bool, device=device)
        key_valid[:n] = slots[None, :] >= pads[:, None]
        key_valid[n:, width:] = True  # idle rows attend to their own tokens only
        positions = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        positions[:n, 0] = width - pads
        slot = torch.tensor(width, device=device)
        step_input = torch.full((bucket, 1), self._eos_id, dtype=torch.long, device=device)
        limit = torch.tensor(limits, device=device)
        done = limit <= 1 if forced else (first == self._eos_id) | (limit <= 1)
        generated = [first]
        for step in range(1, max(limits)):
            if bool(done.all()):  # one sync per token; the loop ends as soon as all are done
                break
            step_input[:n, 0] = generated[-1]
            if self.compiled:
                # Each step starts a new CUDA-graph generation: the previous step's logits
                # are consumed, so the graph may reuse their memory instead of re-recording.
                torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            logits = self._step(step_input, positions, key_valid, slot, cache)
            token = torch.where(done, self._eos_id, self._select(logits[:n]))
            generated.append(token)
            done = done | (limit <= step + 1)
            if not forced:
                done = done | (token == self._eos_id)
            positions += 1
            slot += 1
        return torch.stack(generated, dim=1).cpu()

    def _decode_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        slot: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One token for every row of a bucket; static shapes, so compiled once per bucket."""
        visible = key_valid & (torch.arange(key_valid.shape[1], device=slot.device) <= slot)
        out = self._model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=visible[:, None, None, :],
            past_key_values=cache,
            use_cache=True,
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        if self._config.temperature > 0:
            probs = torch.softmax(logits.float() / self._config.temperature, dim=-1)
            return torch.multinomial(probs, 1).squeeze(1)
        return logits.argmax(dim=-1)

    def _cache(self, bucket: int) -> Any:
        if bucket not in self._caches:
            self._caches[bucket] = static_cache(self._model, bucket, self._cache_len)
        return self._caches[bucket]

    def _now(self, synchronize: bool) -> float:
        if synchronize and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

"""The batched forward of Voxtral Realtime over many streams, each in a slot of its own.

transformers' caches keep one length for the whole batch and its ``generate`` takes one
feature generator for the batch, so streams that start, stop and fall silent at different
times cannot share them. Here every stream owns a slot ``s`` in preallocated tensors:

* conv state: the last mel frames (conv1) and conv1 outputs (conv2) the causal conv stem
  needs before the next chunk;
* encoder keys/values: a ring of ``sliding_window + 3`` positions per layer (a step writes
  4 positions, and the first of them still sees ``sliding_window - 1`` before it);
* decoder keys/values: a ring of the decoder's sliding window (or less, by option);
* the absolute position held in each ring entry (``-1``: empty), from which each row's
  causal, sliding-window mask is built, so rows at different positions share one forward.

``prefill`` starts new streams (the prompt and the first chunk of audio); ``step`` decodes
one 80 ms frame for every active row at once: log-mel of the chunk, conv stem with its
state, 4 encoder positions, projector, one decoder position, argmax. The layers' own weights
and submodules (projections, norms, MLPs, rotary tables) do the math, so it is the model's
arithmetic; what differs from transformers is only where keys and values live. Rows of the
slot range that are not stepping ride along (their results are discarded, and their caches
get their own values back): the slot range is a view, never a copy of the caches.

Compiled (``compile=True``), a step runs at a fixed number of rows, the bucket: the slot
range is padded with idle rows up to the next power of two (or ``slots``), every row
attends over its whole rings, and nothing in the step reads a value back to the host, so
each bucket is one static graph (inductor's C++ on a CPU, CUDA graphs on CUDA), built by
``warm`` before serving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from agent.engines.voxtral_features import batch_buckets
from agent.engines.voxtral_realtime_streams import CHUNK_SAMPLES

N_MELS = 128
HOP = 160
N_FFT = 400
#: Encoder positions per decoder token (the projector stacks this many).
LOG_MEL_FLOOR = 8.0
#: 2400 ms: the longest delay a stream may ask for.
MAX_DELAY_TOKENS = 30

_Forward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int], Tensor]


class LogMel:
    """The feature extractor's log-mel (``VoxtralRealtimeFeatureExtractor``), batched on the
    model's device: same window, filters, clamp and global maximum."""

    def __init__(self, extractor: Any, device: torch.device) -> None:
        self.window = torch.hann_window(N_FFT, device=device)
        self.filters = torch.from_numpy(extractor.mel_filters).to(device, torch.float32)
        self.log_max = float(extractor.global_log_mel_max)

    def __call__(self, audio: Tensor, center: bool) -> Tensor:
        """(rows, samples) float32 -> (rows, 128, frames)."""
        stft = torch.stft(audio, N_FFT, HOP, window=self.window, return_complex=True, center=center)
        power = stft[..., :-1].abs() ** 2
        mel = self.filters.T @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, torch.tensor(self.log_max - LOG_MEL_FLOOR))
        return (log_spec + 4.0) / 4.0


@dataclass
class _Ring:
    """Keys/values of one stack for every slot, and each entry's absolute position."""

    keys: list[Tensor]
    values: list[Tensor]
    pos: Tensor
    size: int
    window: int

    @classmethod
    def allocate(
        cls,
        layers: int,
        slots: int,
        kv_heads: int,
        size: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> _Ring:
        def zeros() -> Tensor:
            return torch.zeros(slots, kv_heads, size, head_dim, dtype=dtype, device=device)

        keys = [zeros() for _ in range(layers)]
        values = [zeros() for _ in range(layers)]
        pos = torch.full((slots, size), -1, dtype=torch.long, device=device)
        return cls(keys, values, pos, size, window)


class BatchedRealtime:
    """Voxtral Realtime's forward for many streams; not thread-safe (one engine thread)."""

    def __init__(
        self,
        model: Any,
        extractor: Any,
        slots: int,
        decoder_context: int = 0,
        compile: bool = False,
        buckets: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.slots = slots
        if any(not 1 <= b <= slots for b in buckets):
            raise ValueError(f"batch buckets {tuple(buckets)} must be in 1..{slots}")
        #: Row counts a compiled step runs at: ``buckets`` and ``slots``, by default the
        #: powers of two up to ``slots``.
        self.buckets = tuple(sorted({*buckets, slots})) if buckets else batch_buckets(slots)
        self.compiled = compile
        self.device: torch.device = model.device
        self.dtype: torch.dtype = model.dtype
        inner = model.model
        self.encoder = inner.audio_tower
        self.lm = inner.language_model
        self.projector = inner.multi_modal_projector
        self.time_embedding = inner.time_embedding
        self.lm_head = model.lm_head
        audio = model.config.audio_config
        text = model.config.text_config
        self.downsample = int(model.config.downsample_factor)
        self.mel_per_token = int(model.config.audio_length_per_tok)
        self.logmel = LogMel(extractor, self.device)
        conv1, conv2 = self.encoder.embedder.conv1, self.encoder.embedder.conv2
        self.conv1_state = torch.zeros(
            slots, N_MELS, conv1.left_pad, device=self.device, dtype=self.dtype
        )
        self.conv2_state = torch.zeros(
            slots, audio.hidden_size, conv2.left_pad, device=self.device, dtype=self.dtype
        )
        enc_window = int(audio.sliding_window)
        self.enc = _Ring.allocate(
            audio.num_hidden_layers,
            slots,
            audio.num_attention_heads,
            enc_window + self.downsample - 1,
            audio.head_dim,
            enc_window,
            self.dtype,
            self.device,
        )
        dec_window = int(text.sliding_window or text.max_position_embeddings)
        if decoder_context:
            dec_window = min(dec_window, decoder_context)
        self.dec = _Ring.allocate(
            text.num_hidden_layers,
            slots,
            text.num_key_value_heads,
            dec_window,
            text.head_dim,
            dec_window,
            self.dtype,
            self.device,
        )
        self._t_cond: dict[int, Tensor] = {}
        #: Rows of the time conditioning by delay in tokens (0 … 30), looked up per step.
        with torch.inference_mode():
            self.t_cond_table = torch.stack([self.t_cond(d) for d in range(MAX_DELAY_TOKENS + 1)])
        self._forward: _Forward = self._step_forward
        if compile:
            self._forward = self._compile(self._step_forward)

    def _compile(self, forward: _Forward) -> _Forward:
        """One static-shape graph per bucket, whole (``fullgraph``: a graph break would run
        part of every step eager, unnoticed); CUDA graphs on CUDA (``reduce-overhead``)."""
        # Past dynamo's recompile limit (8 by default) the step would silently run eager.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(self.buckets) + 4)
        cuda = self.device.type == "cuda"
        if cuda:
            # The caches are mutated in place by every replay: CUDA graphs need them at fixed
            # addresses (else each replay would copy them in and out, or graphs be skipped).
            state = [self.conv1_state, self.conv2_state, self.t_cond_table]
            for ring in (self.enc, self.dec):
                state += [*ring.keys, *ring.values, ring.pos]
            for tensor in state:
                torch._dynamo.mark_static_address(tensor)
        mode = "reduce-overhead" if cuda else "default"
        compiled: _Forward = torch.compile(forward, mode=mode, dynamic=False, fullgraph=True)
        return compiled

    # -- slots -----------------------------------------------------------------------

    def reset(self, slot: int) -> None:
        """A new stream takes ``slot``: empty rings, silent conv state."""
        self.enc.pos[slot] = -1
        self.dec.pos[slot] = -1
        self.conv1_state[slot] = 0
        self.conv2_state[slot] = 0

    def t_cond(self, delay_tokens: int) -> Tensor:
        """The decoder's time conditioning for a delay, shape (hidden,)."""
        cached = self._t_cond.get(delay_tokens)
        if cached is None:
            time = torch.full((1,), delay_tokens, device=self.device, dtype=self.dtype)
            cached = self._t_cond[delay_tokens] = self.time_embedding(time)
        return cached

    # -- the two forwards -------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slots: list[int], audio: Tensor, prompt: Tensor, delay_tokens: int) -> Tensor:
        """Start streams: ``audio`` (rows, samples) is the left padding plus the first chunk,
        ``prompt`` (rows, tokens) the prompt ids (same length: one delay for the group).
        Returns each row's first token."""
        rows = len(slots)
        index = torch.tensor(slots, device=self.device)
        for slot in slots:
            self.reset(slot)
        mel = self.logmel(audio.to(self.device), center=True)
        audio_embeds = self._encode(index, mel, None, None, 0)
        tokens = prompt.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand(rows, -1)
        hidden = self.lm.embed_tokens(tokens) + audio_embeds
        t_cond = self.t_cond(delay_tokens).expand(rows, 1, -1)
        return self._decode(index, hidden, positions, t_cond, None, 0)

    @torch.inference_mode()
    def step(
        self,
        active: Tensor,
        chunks: Tensor,
        tokens: Tensor,
        enc_pos: Tensor,
        dec_pos: Tensor,
        delays: Tensor,
    ) -> Tensor:
        """One frame for slots ``0..n-1`` where ``active`` (n,) is set; host tensors in.

        ``chunks`` (n, 1680): each row's next chunk of audio (zeros where inactive);
        ``tokens`` (n,): the last token; ``enc_pos``/``dec_pos`` (n,): the next positions;
        ``delays`` (n,): delays in tokens. Returns the next token of every row (garbage where
        inactive), on the device.

        Compiled, the rows are padded to the next bucket with inactive rows (slots ``n`` and
        up, whose caches nothing writes) and every row attends over its whole rings, so each
        bucket has one shape and one graph.
        """
        n = active.shape[0]
        rows = self.bucket(n) if self.compiled else n
        if rows > n:
            active, chunks, tokens, enc_pos, dec_pos, delays = (
                torch.cat([t, t.new_zeros((rows - n, *t.shape[1:]))])
                for t in (active, chunks, tokens, enc_pos, dec_pos, delays)
            )
        if self.compiled:
            spans = (self.enc.size, self.dec.size)
        else:
            # Worth attending to: while no row has wrapped its ring, only the filled start
            # of it (computed on the host: no device sync).
            spans = (
                min(self.enc.size, int(enc_pos.max()) + self.downsample),
                min(self.dec.size, int(dec_pos.max()) + 1),
            )
        # Copies when compiled: inputs that share memory (one zeros tensor passed twice) are
        # a guard of the graph, and a different aliasing would compile another.
        on, audio, last, enc, dec, delay = (
            t.to(self.device, copy=self.compiled)
            for t in (active, chunks, tokens, enc_pos, dec_pos, delays)
        )
        if self.compiled and self.device.type == "cuda":
            # The previous step's output buffer may be reused by this replay: it was read.
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        out = self._forward(on, audio, last, enc, dec, delay, *spans)
        return out[:n].clone() if self.compiled else out

    def warm(self, bucket: int, times: int = 3) -> None:
        """Compile (and on CUDA record the graph of) ``bucket``'s step: all rows inactive,
        so no cache is touched. CUDA graphs are recorded at a graph's second or third call."""
        zeros = torch.zeros(bucket, dtype=torch.long)
        for _ in range(times):
            idle = torch.zeros(bucket, dtype=torch.bool)
            self.step(idle, torch.zeros(bucket, CHUNK_SAMPLES), zeros, zeros, zeros, zeros).tolist()

    def bucket(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` rows."""
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the largest bucket {self.buckets[-1]}")

    def _step_forward(
        self,
        active: Tensor,
        chunks: Tensor,
        tokens: Tensor,
        enc_pos: Tensor,
        dec_pos: Tensor,
        delays: Tensor,
        enc_span: int,
        dec_span: int,
    ) -> Tensor:
        """The step on the device; static shapes and no host sync, so it compiles whole."""
        mel = self.logmel(chunks, center=False)
        steps = torch.arange(self.downsample, device=self.device)
        enc_positions = enc_pos[:, None] + steps
        audio_embeds = self._encode(None, mel, enc_positions, active, enc_span)
        hidden = self.lm.embed_tokens(tokens[:, None]) + audio_embeds
        t_cond = self.t_cond_table[delays][:, None]
        return self._decode(None, hidden, dec_pos[:, None], t_cond, active, dec_span)

    # -- stages -----------------------------------------------------------------------
    #
    # ``index`` (a prefill's slots) is ``None`` in a step, whose row i is slot i; ``active``
    # (a step's rows that step, a boolean mask) is ``None`` in a prefill. A step writes its
    # caches with ``where(active, new, old)`` over every row rather than through the active
    # rows' ids: the same shapes whoever steps, and an idle row gets its own values back.

    def _conv(self, index: Tensor | None, mel: Tensor, active: Tensor | None) -> Tensor:
        embedder = self.encoder.embedder
        rows = slice(0, mel.shape[0]) if index is None else index
        state1, state2 = self.conv1_state[rows], self.conv2_state[rows]
        x = torch.cat([state1, mel], dim=-1)
        h = F.gelu(F.conv1d(x, embedder.conv1.weight, embedder.conv1.bias))
        x2 = torch.cat([state2, h], dim=-1)
        out = F.gelu(F.conv1d(x2, embedder.conv2.weight, embedder.conv2.bias, stride=2))
        new1, new2 = x[..., -state1.shape[-1] :], x2[..., -state2.shape[-1] :]
        if active is not None:
            new1 = torch.where(active[:, None, None], new1, state1)
            new2 = torch.where(active[:, None, None], new2, state2)
        self.conv1_state[rows] = new1
        self.conv2_state[rows] = new2
        return out.permute(0, 2, 1)

    def _encode(
        self,
        index: Tensor | None,
        mel: Tensor,
        positions: Tensor | None,
        active: Tensor | None,
        span: int,
    ) -> Tensor:
        """Conv stem, encoder layers, projector."""
        h = self._conv(index, mel.to(self.dtype), active)
        rows, length = h.shape[0], h.shape[1]
        if positions is None:
            positions = torch.arange(length, device=self.device).expand(rows, -1)
        cos, sin = self.encoder.rotary_emb(h, positions)
        mask = self._write_positions(self.enc, index, positions, active, span)
        for i, layer in enumerate(self.encoder.layers):
            x = layer.self_attn_layer_norm(h)
            h = h + self._attend(layer.self_attn, x, cos, sin, self.enc, i, index, mask)
            h = h + layer.mlp(layer.final_layer_norm(h))
        h = self.encoder.norm(h)
        stacked = h.reshape(rows, -1, h.shape[-1] * self.downsample)
        embeds: Tensor = self.projector(stacked)
        return embeds

    def _decode(
        self,
        index: Tensor | None,
        hidden: Tensor,
        positions: Tensor,
        t_cond: Tensor,
        active: Tensor | None,
        span: int,
    ) -> Tensor:
        cos, sin = self.lm.rotary_emb(hidden, positions)
        mask = self._write_positions(self.dec, index, positions, active, span)
        h = hidden
        for i, layer in enumerate(self.lm.layers):
            x = layer.input_layernorm(h)
            h = h + self._attend(layer.self_attn, x, cos, sin, self.dec, i, index, mask)
            x = layer.post_attention_layernorm(h) * (1 + layer.ada_rms_norm(t_cond))
            h = h + layer.mlp(x)
        h = self.lm.norm(h[:, -1])
        logits = self.lm_head(h)
        best: Tensor = logits.argmax(dim=-1)
        return best

    # -- attention over the rings -------------------------------------------------------

    def _write_positions(
        self,
        ring: _Ring,
        index: Tensor | None,
        positions: Tensor,
        active: Tensor | None,
        span: int,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Record the positions written this forward; return (mask, active, where).

        Prefill attends over its own new keys (the rings are empty): only the last
        ``ring.size`` of them are kept. A step writes first, then attends over the ring.
        """
        rows, length = positions.shape
        if index is not None:
            q = positions[:, :, None]
            k = positions[:, None, :]
            mask = (k <= q) & (k > q - ring.window)
            keep = positions[:, max(0, length - ring.size) :]
            where = keep % ring.size
            ring.pos[index[:, None], where] = keep
            return mask[:, None], None, where
        assert active is not None
        where = positions % ring.size
        row = torch.arange(rows, device=self.device)[:, None]
        ring.pos[row, where] = torch.where(active[:, None], positions, ring.pos[row, where])
        kpos = ring.pos[:rows, :span][:, None, :]
        q = positions[:, :, None]
        mask = (kpos >= 0) & (kpos <= q) & (kpos > q - ring.window)
        # An idle row may have nothing to attend to; all-masked rows would give NaN (harmless
        # to the others, but NaN is slow on some paths and confusing when debugging).
        mask = mask | ~active[:, None, None]
        return mask[:, None], active, where

    def _attend(
        self,
        attn: Any,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        ring: _Ring,
        layer: int,
        index: Tensor | None,
        written: tuple[Tensor, Tensor | None, Tensor],
    ) -> Tensor:
        from transformers.models.voxtral_realtime.modeling_voxtral_realtime import (
            apply_rotary_pos_emb,
        )

        mask, active, where = written
        rows, length = x.shape[0], x.shape[1]
        shape = (rows, length, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = ring.keys[layer], ring.values[layer]
        if index is not None:  # prefill: attend over the new keys, keep the last ones
            kept = where.shape[1]
            keys[index[:, None], :, where] = k[:, :, -kept:].transpose(1, 2)
            values[index[:, None], :, where] = v[:, :, -kept:].transpose(1, 2)
            k_all, v_all = k, v
        else:
            assert active is not None
            row = torch.arange(rows, device=self.device)[:, None]
            on = active[:, None, None, None]
            keys[row, :, where] = torch.where(on, k.transpose(1, 2), keys[row, :, where])
            values[row, :, where] = torch.where(on, v.transpose(1, 2), values[row, :, where])
            span = mask.shape[-1]
            k_all, v_all = keys[:rows, :, :span], values[:rows, :, :span]
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, scale=attn.scaling, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(rows, length, -1)
        result: Tensor = attn.o_proj(out)
        return result

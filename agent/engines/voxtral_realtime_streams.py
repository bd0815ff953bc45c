"""One stream's audio bookkeeping for Voxtral Realtime: which samples make which frame.

Synchronous and model-free, so the framing is tested on its own. With a delay of ``d``
tokens (``d`` × 80 ms), the first forward takes the first ``(d + 1) × 1280 + 40`` samples
behind 32 tokens of silence (the processor's streaming prompt), and token ``k ≥ 1`` takes the
1680 samples from ``(d + k) × 1280 − 200``: one 80 ms frame plus the STFT window around it,
which makes the per-chunk log-mel frames exactly the frames of the whole signal's log-mel.
Token ``k`` is the text of the audio ``[80 k, 80 (k + 1))`` ms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLES_PER_TOKEN = 1280
CHUNK_SAMPLES = 1680  # 8 mel hops + the 400-sample window
#: Samples of the first chunk beyond its whole tokens (half a window, less a hop: 200 − 160).
FIRST_EXTRA = 40
#: How far a chunk starts before its frame (half the window).
LOOK_BACK = 200
LEFT_PAD_TOKENS = 32
#: mistral-common's ``OFFLINE_STREAMING_BUFFER_TOKENS``: silence after the end so the last
#: word's tokens come out.
BUFFER_TOKENS = 10

Samples = npt.NDArray[np.float32]


class StreamAudio:
    """The samples of one stream not yet consumed, and the frames they make."""

    def __init__(self, delay_tokens: int) -> None:
        self.delay_tokens = delay_tokens
        self._buffer = np.zeros(0, dtype=np.float32)
        self._base = 0  # absolute index of _buffer[0]
        self.received = 0  # samples pushed (without the flush's padding)
        self.tokens = 0  # tokens taken so far (0: not started)
        self.flushed = False

    @property
    def first_samples(self) -> int:
        return (self.delay_tokens + 1) * SAMPLES_PER_TOKEN + FIRST_EXTRA

    def needed(self, token: int) -> int:
        """Samples that must be in before token ``token`` can be decoded."""
        if token == 0:
            return self.first_samples
        return (self.delay_tokens + token + 1) * SAMPLES_PER_TOKEN + LOOK_BACK

    def push(self, samples: Samples) -> None:
        if self.flushed:
            return
        self._buffer = np.concatenate([self._buffer, samples.astype(np.float32, copy=False)])
        self.received += len(samples)

    def flush(self) -> None:
        """Pad the end with silence: the last frame's delay and the word buffer."""
        if self.flushed:
            return
        end = self._base + len(self._buffer)
        whole = -(-end // SAMPLES_PER_TOKEN) * SAMPLES_PER_TOKEN
        pad = whole - end + (self.delay_tokens + 1 + BUFFER_TOKENS) * SAMPLES_PER_TOKEN
        self._buffer = np.concatenate([self._buffer, np.zeros(pad, dtype=np.float32)])
        self.flushed = True

    @property
    def available(self) -> int:
        return self._base + len(self._buffer)

    def ready(self) -> bool:
        return self.available >= self.needed(self.tokens)

    @property
    def finished(self) -> bool:
        """Flushed and every frame its audio makes was taken."""
        return self.flushed and not self.ready()

    def take_first(self) -> Samples:
        """The first chunk behind its left padding (for the prefill)."""
        assert self.tokens == 0 and self.ready()
        chunk = self._buffer[: self.first_samples]
        silence = np.zeros(LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN, np.float32)
        padded: Samples = np.concatenate([silence, chunk])
        self.tokens = 1
        self._drop_before(self.needed(1) - CHUNK_SAMPLES)
        return padded

    def take_next(self) -> Samples:
        """The next token's 1680 samples."""
        assert self.tokens >= 1 and self.ready()
        start = self.needed(self.tokens) - CHUNK_SAMPLES - self._base
        chunk: Samples = self._buffer[start : start + CHUNK_SAMPLES]
        self.tokens += 1
        self._drop_before(self.needed(self.tokens) - CHUNK_SAMPLES)
        return chunk

    def backlog_ms(self) -> float:
        """Complete audio waiting beyond the next frame: the engine is this far behind."""
        waiting = min(self.received, self.available) - self.needed(self.tokens)
        return max(0.0, waiting / 16.0)

    def _drop_before(self, absolute: int) -> None:
        cut = absolute - self._base
        if cut > 0:
            self._buffer = self._buffer[cut:]
            self._base = absolute


class TokenText:
    """A stream's tokens as text pieces: Tekken pieces are bytes, so a piece that ends
    inside a UTF-8 character waits for the token that completes it."""

    #: A character is at most 4 bytes: past that many held tokens, give up waiting.
    MAX_HELD = 4

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._held: list[int] = []

    def add(self, token: int) -> str:
        self._held.append(token)
        text: str = self._tokenizer.decode(self._held, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(self._held) < self.MAX_HELD:
            return ""
        self._held = []
        return text

    def finish(self) -> str:
        if not self._held:
            return ""
        text: str = self._tokenizer.decode(self._held, skip_special_tokens=True)
        self._held = []
        return text

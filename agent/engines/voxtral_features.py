"""Inputs of the Voxtral engine: log-mel features on the model's device, prompts, checks.

Both are fixed by the model, not tuning knobs. Voxtral's audio tower is Whisper's encoder: it
takes 128 log-mel bins of a 400-point FFT every 160 samples, always over a 30 s window
(3000 frames), and turns one window into 375 audio tokens. The prompt is mistral-common's
``TranscriptionRequest`` layout: ``<s>[INST][BEGIN_AUDIO][AUDIO]×375[/INST]lang:xx[TRANSCRIBE]``,
with the ``lang:xx`` part only when a language is given.

The features are computed here in torch, batched, on the GPU when the model is there: the
processor's own path encodes every array to a WAV file, decodes it again and runs the FFT on
the CPU one utterance at a time, which costs more than the encoder itself at small batches.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from agent.engines.base import SAMPLE_RATE, EngineRequest
from agent.errors import EngineError

#: Samples in the one window the encoder accepts (30 s at 16 kHz).
CHUNK_SAMPLES = 30 * SAMPLE_RATE
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
#: Log-mel frames per window: the encoder rejects any other length.
N_FRAMES = CHUNK_SAMPLES // HOP_LENGTH
#: Audio tokens per window: two stride-2 steps (conv, then 4 frames stacked by the projector).
AUDIO_TOKENS_PER_CHUNK = 375


class LogMel:
    """Whisper's log-mel spectrogram, batched in torch on ``device``.

    Same recipe as ``WhisperFeatureExtractor`` (Hann window, power spectrum, the extractor's own
    Slaney mel filters, log10, 8 dB dynamic range per utterance, scaled to about [-1, 1]), so
    the encoder sees what it was trained on; ``tests/unit/test_voxtral_engine.py`` checks the
    numbers against the processor's extractor.
    """

    def __init__(self, mel_filters: npt.NDArray[Any], device: torch.device) -> None:
        filters = torch.as_tensor(np.asarray(mel_filters), dtype=torch.float32)
        if tuple(filters.shape) != (N_FFT // 2 + 1, N_MELS):
            raise ValueError(f"expected {N_MELS} mel filters over {N_FFT // 2 + 1} bins")
        # (n_mels, n_freq): one matmul maps every frame of the batch to mel bins.
        self._filters = filters.T.contiguous().to(device)
        self._window = torch.hann_window(N_FFT, device=device)
        self.device = device

    def __call__(self, audio: Sequence[npt.NDArray[np.float32]]) -> torch.Tensor:
        """Features ``(len(audio), 128, 3000)`` float32 on ``device``; each input <= 30 s."""
        host = np.zeros((len(audio), CHUNK_SAMPLES), dtype=np.float32)
        for row, samples in zip(host, audio, strict=True):
            row[: len(samples)] = samples  # zero padding to 30 s, as the processor does
        waveform = torch.from_numpy(host)
        if self.device.type == "cuda":
            # Pinned memory lets the copy overlap with whatever the GPU is still running.
            waveform = waveform.pin_memory().to(self.device, non_blocking=True)
        stft = torch.stft(
            waveform,
            N_FFT,
            HOP_LENGTH,
            window=self._window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        # Whisper drops the last frame: 3001 centred frames -> 3000.
        power = stft[..., :-1].abs().square()
        mel = torch.matmul(self._filters, power)
        log_spec = mel.clamp(min=1e-10).log10()
        # Per utterance, like the extractor: the floor is 8 (log10 units) below its own peak.
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0


@dataclass(frozen=True)
class Prompt:
    """Token ids of one transcription prompt and where its audio tokens sit."""

    ids: tuple[int, ...]
    language: str | None

    def __len__(self) -> int:
        return len(self.ids)


class TranscriptionPrompts:
    """Builds prompts with mistral-common's own ``encode_transcription``, one per language.

    The prompt depends only on the language (every utterance fills one 30 s window), so each
    is built once from a silent clip and reused. Going through mistral-common rather than
    writing the ids by hand keeps the layout right for any tokenizer version it knows.
    """

    def __init__(self, mistral_tokenizer: Any, audio_token_id: int) -> None:
        self._tokenizer = mistral_tokenizer
        self._audio_token_id = audio_token_id
        self._cache: dict[str | None, Prompt] = {}
        self._silence = _wav_bytes(np.zeros(SAMPLE_RATE, dtype=np.float32))

    def get(self, language: str | None) -> Prompt:
        """The prompt for ``language`` (ISO 639-1), or for detection when ``None``.

        Raises ``EngineError`` (code ``invalid_language``) for a code mistral-common rejects.
        """
        if language is not None:
            language = language.strip().lower()  # "EN" and "en" are the same request
        prompt = self._cache.get(language)
        if prompt is None:
            prompt = self._build(language)
            self._cache[language] = prompt
        return prompt

    def _build(self, language: str | None) -> Prompt:
        from mistral_common.protocol.transcription.request import TranscriptionRequest
        from pydantic import ValidationError

        try:
            # Validated from a dict: pydantic then checks the code against ISO 639-1.
            request = TranscriptionRequest.model_validate(
                {"audio": self._silence, "language": language}
            )
        except ValidationError:
            raise EngineError(
                f"language {language!r} is not an ISO 639-1 code", "invalid_language"
            ) from None
        ids = tuple(int(i) for i in self._tokenizer.encode_transcription(request).tokens)
        n_audio = sum(1 for i in ids if i == self._audio_token_id)
        if n_audio != AUDIO_TOKENS_PER_CHUNK:  # pragma: no cover - a tokenizer we do not know
            raise ValueError(
                f"the tokenizer gave {n_audio} audio tokens for one 30 s window, "
                f"expected {AUDIO_TOKENS_PER_CHUNK}"
            )
        return Prompt(ids=ids, language=language)


def _wav_bytes(samples: npt.NDArray[np.float32]) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def max_new_tokens(duration_s: float, *, per_second: float, margin: int, cap: int) -> int:
    """Upper bound on the tokens generated for ``duration_s`` of audio.

    ``ceil(per_second × duration) + margin``, at most ``cap``. Fast speech is about 3–4 words
    per second and Tekken spends 1.3–2 tokens per word (more for non-Latin scripts), so the
    default 8 tokens/s leaves room for dense speech while a looping model on noise stops
    early instead of running for the whole window.
    """
    return min(cap, int(np.ceil(per_second * duration_s)) + margin)


def audio_problem(audio: Any) -> tuple[str, str] | None:
    """``(code, reason)`` when ``audio`` cannot be transcribed, else ``None``."""
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        return "invalid_audio", "audio must be a 1-D array of 16 kHz mono samples"
    if audio.size == 0:
        return "empty_audio", "audio is empty"
    if audio.size > CHUNK_SAMPLES:
        return "audio_too_long", f"audio is {audio.size / SAMPLE_RATE:.1f} s, more than 30 s"
    if not np.isfinite(audio).all():
        return "invalid_audio", "audio contains NaN or infinite samples"
    return None


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to compile: powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return tuple(sorted(sizes | {max_batch}))


def check_batch(
    batch: Sequence[EngineRequest], prompts: TranscriptionPrompts, default_language: str | None
) -> list[Prompt]:
    """Each item's prompt, after checking every item before any compute.

    Raises one ``EngineError`` naming every bad item (``item 1: audio is empty``), with the
    first one's code; the worker then retries item by item, so each fails with its own.
    """
    found: list[Prompt] = []
    problems: list[tuple[str, str]] = []
    for index, request in enumerate(batch):
        problem = audio_problem(request.audio)
        if problem is not None:
            problems.append((f"item {index}: {problem[1]}", problem[0]))
        try:
            found.append(prompts.get(request.language or default_language))
        except EngineError as exc:
            problems.append((f"item {index}: {exc}", exc.code))
    if problems:
        raise EngineError("; ".join(text for text, _ in problems), problems[0][1])
    return found

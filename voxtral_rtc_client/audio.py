"""Audio for a client: a local file as 16 kHz mono float32, and float samples as a WAV.

The client trusts its own files, so PyAV opens them as FFmpeg guesses (the server decodes
anyone's bytes far more carefully, in ``agent.audio_file``).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000

Samples = npt.NDArray[np.float32]


def read_audio(path: str | Path, rate: int = SAMPLE_RATE) -> Samples:
    """Decode a local audio file into mono float32 at ``rate`` (FFmpeg's resampler)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    frames: list[av.AudioFrame] = []
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.audio[0]):
            frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    pieces = [np.asarray(f.to_ndarray(), np.float32).reshape(-1) for f in frames]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def wav_bytes(samples: Samples, rate: int = SAMPLE_RATE) -> bytes:
    """Mono 16-bit PCM WAV (what ``/v1/audio/transcriptions`` reads fastest)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()


def without_pauses(
    audio: Samples,
    regions_s: Sequence[tuple[float, float]],
    seconds: float,
    rate: int = SAMPLE_RATE,
) -> Samples:
    """The speech ``regions_s`` of ``audio`` joined back to back, over and over, until
    ``seconds`` (half a second of silence before, one after): speech a VAD never cuts, to
    test what a server does with a long utterance."""
    pieces = [audio[int(a * rate) : int(b * rate)] for a, b in regions_s]
    out: list[Samples] = []
    while sum(len(p) for p in out) < seconds * rate:
        out.extend(pieces)
    lead = np.zeros(rate // 2, np.float32)
    return np.concatenate([lead, *out, np.zeros(rate, np.float32)])

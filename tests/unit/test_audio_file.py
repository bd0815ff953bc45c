"""Decoding: every container the endpoint promises, any rate and channel count to 16 kHz
mono through a real resampler, and clear errors for empty, broken and too-long input."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import pytest

from agent.audio_file import decode_audio
from agent.errors import AudioInputError
from tests.audio_files import ENCODINGS, encode, wav_bytes


@pytest.mark.parametrize("kind", sorted(ENCODINGS))
def test_every_format_decodes_to_16k_mono(
    kind: str, beckett_audio: npt.NDArray[np.float32]
) -> None:
    decoded = decode_audio(encode(beckett_audio, kind))
    assert decoded.rate == 16_000 and decoded.samples.dtype == np.float32
    assert decoded.source_channels == 2 and decoded.source_rate in (44_100, 48_000)
    assert decoded.duration_s == pytest.approx(len(beckett_audio) / 16_000, abs=0.06)
    # Same signal after the round trip (codecs add a few hundred samples of delay).
    assert _best_correlation(decoded.samples, beckett_audio, max_lag=1000) > 0.9


def _best_correlation(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], max_lag: int
) -> float:
    """Highest normalised correlation of ``a`` delayed by 0..max_lag samples against ``b``."""
    n = min(len(a), len(b)) - max_lag
    ref = b[:n] - b[:n].mean()
    scores = []
    for lag in range(0, max_lag, 4):
        seg = a[lag : lag + n] - a[lag : lag + n].mean()
        scores.append(float(np.dot(seg, ref) / (np.linalg.norm(seg) * np.linalg.norm(ref))))
    return max(scores)


def test_resampling_is_band_limited() -> None:
    """A 1 kHz tone at 44.1 kHz keeps its frequency and level at 16 kHz."""
    t = np.arange(44_100) / 44_100
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    decoded = decode_audio(wav_bytes(tone, rate=44_100))
    assert len(decoded.samples) == pytest.approx(16_000, abs=32)
    spectrum = np.abs(np.fft.rfft(decoded.samples[1000:15000]))
    peak_hz = np.argmax(spectrum) * 16_000 / len(decoded.samples[1000:15000])
    assert peak_hz == pytest.approx(1000, abs=5)
    assert np.sqrt(np.mean(decoded.samples[1000:15000] ** 2)) == pytest.approx(0.354, abs=0.02)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_audio"),
        (b"this is not audio at all " * 20, "invalid_audio"),
        (wav_bytes(np.zeros(0, dtype=np.float32)), "empty_audio"),
    ],
)
def test_bad_input_is_a_clear_error(data: bytes, code: str) -> None:
    with pytest.raises(AudioInputError) as info:
        decode_audio(data)
    assert info.value.code == code
    assert "Traceback" not in str(info.value)


def test_duration_limit_is_enforced_while_decoding() -> None:
    with pytest.raises(AudioInputError) as info:
        decode_audio(wav_bytes(np.zeros(16_000 * 6, dtype=np.float32)), max_duration_s=5)
    assert info.value.code == "audio_too_long"
    assert "limits.max_audio_s" in str(info.value)


def test_decode_can_be_cancelled() -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AudioInputError) as info:
        decode_audio(wav_bytes(np.zeros(16_000, dtype=np.float32)), cancel=cancel)
    assert info.value.code == "cancelled"

"""``read_pcm16_wav``: the canonical 16 kHz mono PCM16 WAV (what a gateway sends) read in
process gives FFmpeg's samples to the bit; any other WAV is left to the decoder (None), and
the header checks and the duration limit apply first."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from agent.audio_file import decode_audio, read_pcm16_wav
from agent.audio_formats import pcm16_wav
from agent.errors import AudioInputError
from tests.support.audio_files import encode


def speechlike(seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    n = int(16_000 * seconds)
    return (0.4 * np.sin(np.arange(n) / 9) + 0.1 * rng.standard_normal(n)).astype(np.float32)


def test_the_gateways_wav_reads_as_ffmpeg_decodes_it() -> None:
    wav = pcm16_wav(speechlike())
    fast = read_pcm16_wav(wav, max_duration_s=60)
    assert fast is not None
    slow = decode_audio(wav)
    assert np.array_equal(fast.samples, slow.samples)
    assert (fast.rate, fast.source_rate, fast.source_channels) == (16_000, 16_000, 1)


def _with_chunk_before_data(wav: bytes) -> bytes:
    """The same file with a LIST chunk between ``fmt `` and ``data`` (still canonical)."""
    fmt_end = 12 + 8 + 16
    extra = b"LIST" + struct.pack("<I", 4) + b"INFO"
    body = wav[12:fmt_end] + extra + wav[fmt_end:]
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def test_a_chunk_between_fmt_and_data_is_skipped() -> None:
    wav = pcm16_wav(speechlike(0.5))
    fast = read_pcm16_wav(_with_chunk_before_data(wav))
    assert fast is not None and np.array_equal(fast.samples, decode_audio(wav).samples)


@pytest.mark.parametrize(
    "data",
    [
        pcm16_wav(speechlike(), rate=8_000),  # another rate: the resampler's work
        encode(speechlike(), "wav"),  # 44.1 kHz stereo
        encode(speechlike(), "flac"),  # not a WAV
        pcm16_wav(speechlike())[:-100],  # data cut short: the decoder says what it makes of it
        pcm16_wav(np.zeros(0, np.float32)),  # no samples: the decoder's empty_audio
    ],
    ids=["8khz", "stereo-44k", "flac", "truncated", "empty"],
)
def test_anything_else_goes_to_the_decoder(data: bytes) -> None:
    assert read_pcm16_wav(data) is None


def test_header_checks_and_the_duration_limit_still_apply() -> None:
    wav = bytearray(pcm16_wav(speechlike()))
    with pytest.raises(AudioInputError) as err:
        read_pcm16_wav(bytes(wav), max_duration_s=0.5)
    assert err.value.code == "audio_too_long"
    struct.pack_into("<I", wav, 24, 1)  # the fmt chunk claims 1 Hz
    with pytest.raises(AudioInputError) as err:
        read_pcm16_wav(bytes(wav))
    assert err.value.code == "invalid_audio"

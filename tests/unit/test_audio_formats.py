"""Appended audio -> 16 kHz: G.711 tables against FFmpeg's own codecs, and chunking that
does not change the result."""

from __future__ import annotations

import itertools

import av
import numpy as np
import pytest

from agent.audio_formats import ALAW, PCM16_24K, PCMA, PCMU, ULAW, PcmDecoder, resampler


def ffmpeg_encode(s16: np.ndarray, codec: str) -> bytes:
    ctx = av.CodecContext.create(codec, "w")
    ctx.sample_rate, ctx.format, ctx.layout = 8000, "s16", "mono"
    frame = av.AudioFrame.from_ndarray(s16.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def ffmpeg_decode(data: bytes, codec: str) -> np.ndarray:
    ctx = av.CodecContext.create(codec, "r")
    ctx.sample_rate, ctx.layout = 8000, "mono"
    frames = ctx.decode(av.Packet(data))
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)


@pytest.mark.parametrize(("codec", "table"), [("pcm_mulaw", ULAW), ("pcm_alaw", ALAW)])
def test_g711_tables_equal_ffmpeg(codec: str, table: np.ndarray) -> None:
    every_code = bytes(range(256))
    reference = ffmpeg_decode(every_code, codec) / 32768.0
    assert np.array_equal(table, reference)


@pytest.mark.parametrize("fmt", [PCM16_24K, PCMU, PCMA], ids=lambda f: f.encoding)
def test_chunking_does_not_change_the_audio(fmt: object) -> None:
    rate = 24_000 if fmt is PCM16_24K else 8_000
    t = np.arange(rate) / rate
    s16 = (0.4 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    if fmt is PCM16_24K:
        data = s16.tobytes()
    else:
        data = ffmpeg_encode(s16, "pcm_mulaw" if fmt is PCMU else "pcm_alaw")
    whole = PcmDecoder(fmt)  # type: ignore[arg-type]
    one = np.concatenate([whole.decode(data), whole.flush()])
    pieces = PcmDecoder(fmt)  # type: ignore[arg-type]
    # Odd sizes: pcm16 samples split across appends too.
    cuts = [0, 1, 7, 333, 1001, 4097, len(data)]
    parts = [pieces.decode(data[a:b]) for a, b in itertools.pairwise(cuts)]
    many = np.concatenate([*parts, pieces.flush()])
    assert len(one) == len(many) == 16_000
    assert np.allclose(one, many, atol=1e-6)
    # A 440 Hz tone stays one: the resampled signal's spectrum peaks there.
    spectrum = np.abs(np.fft.rfft(one))
    assert abs(np.argmax(spectrum) - 440) <= 1


def _level_db(samples: np.ndarray, amplitude: float) -> float:
    """A steady tone's level against ``amplitude``, its filter's start and end left out."""
    steady = samples[4000:-4000]
    return float(20 * np.log10(np.sqrt(2) * steady.std() / amplitude))


@pytest.mark.parametrize("rate", [24_000, 48_000])
def test_the_resampler_keeps_the_top_of_whisper_band_and_folds_nothing_into_it(
    rate: int,
) -> None:
    """16-kHz output keeps up to 7.5 kHz at full level (libswresample's default filter took
    ~3 dB off there and ~5-8 dB off 7.7-7.9 kHz, where tiny.en heard fricatives worse) and a
    tone above 8 kHz is removed rather than folded back under it (the default let 8.5 kHz
    through as 7.5 kHz at -26 dB). 24 kHz is the WebSocket's PCM, 48 kHz WebRTC's Opus."""

    def through(freq: float) -> np.ndarray:
        t = np.arange(2 * rate) / rate
        tone = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        if rate == PCM16_24K.rate:
            decoder = PcmDecoder(PCM16_24K)
            pcm = (tone * 32767).astype("<i2").tobytes()
            return np.concatenate([decoder.decode(pcm), decoder.flush()])
        frame = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
        frame.sample_rate = rate
        convert = resampler()
        out = [*convert.resample(frame), *convert.resample(None)]
        return np.concatenate([f.to_ndarray().reshape(-1) for f in out])

    for freq in (1000, 6000, 7000, 7500):
        assert abs(_level_db(through(freq), 0.5)) < 0.2, freq
    assert _level_db(through(7700), 0.5) > -1
    assert _level_db(through(8500), 0.5) < -60

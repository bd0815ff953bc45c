"""Build test audio files in memory: any container and codec PyAV encodes, and WAVs."""

from __future__ import annotations

import io

import av
import numpy as np
import numpy.typing as npt

from agent.audio_formats import pcm16_wav

#: (container format, codec, sample rate) per file kind the endpoint must accept.
ENCODINGS = {
    "wav": ("wav", "pcm_s16le", 44_100),
    "mp3": ("mp3", "libmp3lame", 44_100),
    "ogg": ("ogg", "libopus", 48_000),
    "flac": ("flac", "flac", 44_100),
    "m4a": ("ipod", "aac", 44_100),
    "webm": ("webm", "libopus", 48_000),
}


def encode(samples16k: npt.NDArray[np.float32], kind: str, stereo: bool = True) -> bytes:
    """``samples16k`` (16 kHz mono) as a ``kind`` file at that codec's usual rate."""
    fmt, codec, rate = ENCODINGS[kind]
    layout = "stereo" if stereo else "mono"
    source = np.stack([samples16k, samples16k * 0.5]) if stereo else samples16k[None, :]
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(source, dtype=np.float32), format="fltp", layout=layout
    )
    frame.sample_rate = 16_000
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        ctx = stream.codec_context
        resampler = av.AudioResampler(
            format=ctx.format.name, layout=layout, rate=rate, frame_size=ctx.frame_size or None
        )
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(out):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def wav_bytes(samples: npt.NDArray[np.float32], rate: int = 16_000) -> bytes:
    """Mono 16-bit PCM WAV (the server's own writer: what the remote engine sends)."""
    return pcm16_wav(samples, rate)

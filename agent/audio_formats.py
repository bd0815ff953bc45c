"""Audio a client sends as bytes (``input_audio_buffer.append``) -> 16 kHz mono float32.

The OpenAI Realtime formats: ``audio/pcm`` (16-bit little-endian mono at 24 kHz, the default;
beta name ``pcm16``), ``audio/pcmu`` and ``audio/pcma`` (G.711 mu-law and A-law at 8 kHz; beta
``g711_ulaw``, ``g711_alaw``). G.711 is expanded with a 256-entry table (``audioop`` left
Python in 3.13); the rate is converted by PyAV's resampler (``resampler``: the one every
audio input of the server uses), which keeps its filter state between appends, so chunk
boundaries leave no clicks and the result does not depend on how the client cut its audio.

Synchronous and I/O-free: the session runs ``PcmDecoder.decode`` on a worker thread.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000

Encoding = Literal["pcm16", "pcmu", "pcma"]


@dataclass(frozen=True)
class InputFormat:
    """An input audio format: its encoding and sample rate."""

    encoding: Encoding
    rate: int

    @property
    def ga(self) -> dict[str, object]:
        """The GA ``audio.input.format`` object."""
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": f"audio/{self.encoding}"}

    @property
    def beta(self) -> str:
        """The beta ``input_audio_format`` name."""
        return {"pcm16": "pcm16", "pcmu": "g711_ulaw", "pcma": "g711_alaw"}[self.encoding]

    @property
    def bytes_per_second(self) -> int:
        return self.rate * (2 if self.encoding == "pcm16" else 1)


#: libswresample's default filter (32 taps a phase, cutoff 0.97) takes ~3 dB off 7.5 kHz and
#: 5-8 dB off 7.7-7.9 kHz of 16-kHz output, the top of Whisper's log-mel where fricatives
#: are, and folds 8.5 kHz back in at -26 dB; tiny.en hears the difference. read8's turns
#: decoded as the live path decodes them (``bench/offline_wer.py --turns-only``, 1203 words)
#: after 16 -> 24 -> 16 kHz: 111 errors through an ideal (FFT) resampler both ways, 117 with
#: the default down, 125 with it both ways (the original: 110); with these options down,
#: 109 (118 after the default up). About the same CPU: ~0.1 % of a core for 48-kHz stereo.
RESAMPLER_OPTIONS = {"filter_size": "128", "cutoff": "0.99", "kaiser_beta": "12"}


def resampler(rate: int = SAMPLE_RATE) -> av.AudioResampler:
    """Any PyAV audio frame -> mono float32 at ``rate``: every audio input of the server
    (WebRTC, the WebSocket's and Twilio's bytes, files) goes through one of these."""
    return av.AudioResampler(format="flt", layout="mono", rate=rate, options=RESAMPLER_OPTIONS)


PCM16_24K = InputFormat("pcm16", 24_000)
PCMU = InputFormat("pcmu", 8_000)
PCMA = InputFormat("pcma", 8_000)

#: Every name a client may use for a format: GA ``type``s and beta names.
BY_NAME: dict[str, InputFormat] = {
    "audio/pcm": PCM16_24K,
    "pcm16": PCM16_24K,
    "audio/pcmu": PCMU,
    "g711_ulaw": PCMU,
    "audio/pcma": PCMA,
    "g711_alaw": PCMA,
}


def _ulaw_table() -> npt.NDArray[np.float32]:
    # ITU-T G.711: bits inverted; sign, 3-bit exponent, 4-bit mantissa; bias 0x84.
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    magnitude = (((codes & 0x0F) << 3) + 0x84) << exponent
    linear = np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84)
    return (linear / 32768.0).astype(np.float32)


def _alaw_table() -> npt.NDArray[np.float32]:
    # ITU-T G.711: even bits inverted (xor 0x55); sign, 3-bit exponent, 4-bit mantissa.
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    linear = np.where(codes & 0x80, magnitude, -magnitude)
    return (linear / 32768.0).astype(np.float32)


ULAW = _ulaw_table()
ALAW = _alaw_table()


class PcmDecoder:
    """One stream's bytes in ``fmt`` -> 16 kHz float32, chunk after chunk."""

    def __init__(self, fmt: InputFormat) -> None:
        self.format = fmt
        self._odd = b""  # a pcm16 sample split between two appends
        self._resampler = resampler()

    def decode(self, data: bytes) -> npt.NDArray[np.float32]:
        samples = self._expand(data)
        if not len(samples):
            return np.zeros(0, np.float32)
        if self.format.rate == SAMPLE_RATE:
            return samples
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.format.rate
        return _joined(self._resampler.resample(frame))

    def flush(self) -> npt.NDArray[np.float32]:
        """The resampler's last few ms (its filter delay), at the end of the stream."""
        if self.format.rate == SAMPLE_RATE:
            return np.zeros(0, np.float32)
        return _joined(self._resampler.resample(None))

    def _expand(self, data: bytes) -> npt.NDArray[np.float32]:
        if self.format.encoding == "pcmu":
            return ULAW[np.frombuffer(data, np.uint8)]
        if self.format.encoding == "pcma":
            return ALAW[np.frombuffer(data, np.uint8)]
        data = self._odd + data
        whole = len(data) - len(data) % 2
        self._odd = data[whole:]
        return np.frombuffer(data[:whole], "<i2").astype(np.float32) / 32768.0


def _joined(frames: list[av.AudioFrame]) -> npt.NDArray[np.float32]:
    if not frames:
        return np.zeros(0, np.float32)
    parts = [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def pcm16_wav(samples: npt.NDArray[np.float32], rate: int = SAMPLE_RATE) -> bytes:
    """Mono float32 in [-1, 1] at ``rate`` -> a 16-bit PCM WAV file (about 1 ms per 10 s).

    The canonical file: one ``fmt `` chunk then ``data``, which ``agent.audio_file`` reads
    without a decoder process (``read_pcm16_wav``). The remote engine sends utterances so.
    """
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    return out.getvalue()

"""Shared by the client drivers in this folder; standard library only.

Each driver runs with its framework's own virtualenv (``.venvs/<name>/bin/python``), never
imports the project, and talks to the server only through the real client package. What
they share is plumbing: reading the WAV, resampling and G.711-encoding it in pure Python,
pacing it by the clock, and printing one JSON line per thing received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import wave
from array import array
from collections.abc import AsyncIterator
from typing import Any


def base_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--wav", required=True, help="16-bit PCM WAV, mono")
    parser.add_argument("--token", default="", help="bearer token (api_key)")
    parser.add_argument("--expect", type=int, default=6, help="finals to wait for")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds, overall")
    parser.add_argument("--chunk-ms", type=int, default=20, help="audio per message")
    parser.add_argument("--tail-s", type=float, default=1.5, help="silence after the WAV")
    return parser


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout per thing received (and a few things done)."""
    record.setdefault("t", round(time.monotonic() - _T0, 3))
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


_T0 = time.monotonic()


def read_wav(path: str) -> tuple[array, int]:
    """Samples (int16, mono) and sample rate."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: need 16-bit mono PCM")
        rate = w.getframerate()
        samples = array("h")
        samples.frombytes(w.readframes(w.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples, rate


def resample(samples: array, src: int, dst: int, half_taps: int = 12) -> array:
    """Windowed-sinc (Hann) rational resampler, int16 in and out; cutoff at the lower Nyquist.

    Pure Python so the openai venv needs nothing beyond the SDK; ~1 s for 10 s of audio.
    """
    if src == dst:
        return array("h", samples)
    g = math.gcd(src, dst)
    up, down = dst // g, src // g
    cutoff = min(1.0, dst / src) * 0.95  # of the input's Nyquist
    # One filter per output phase: output n sits at input position n * down / up.
    phases: list[list[float]] = []
    for p in range(up):
        frac = p / up
        taps = []
        for k in range(-half_taps + 1, half_taps + 1):
            x = k - frac
            arg = x * cutoff
            s = cutoff if arg == 0 else math.sin(math.pi * arg) / (math.pi * x)
            w = 0.5 + 0.5 * math.cos(math.pi * x / half_taps) if abs(x) < half_taps else 0.0
            taps.append(s * w)
        phases.append(taps)
    padded = [0.0] * half_taps + [float(v) for v in samples] + [0.0] * (half_taps + 1)
    n_out = len(samples) * up // down
    out = array("h", bytes(2 * n_out))
    width = 2 * half_taps
    for n in range(n_out):
        pos = n * down
        base, p = divmod(pos, up)
        taps = phases[p]
        window = padded[base + 1 : base + 1 + width]
        v = sum(map(float.__mul__, taps, window))
        out[n] = -32768 if v < -32768 else 32767 if v > 32767 else round(v)
    return out


def _ulaw(sample: int) -> int:
    """G.711 mu-law of one int16 (the CCITT/Sun reference, as audioop had it)."""
    value = sample >> 2
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 0x21
    for seg, end in enumerate((0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)):
        if value <= end:
            return ((seg << 4) | ((value >> (seg + 1)) & 0x0F)) ^ mask
    return 0x7F ^ mask


def _alaw(sample: int) -> int:
    sign = 0x00 if sample < 0 else 0x80
    magnitude = min(-sample - 1 if sample < 0 else sample, 32767) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        exponent = magnitude.bit_length() - 5
        code = (exponent << 4) | ((magnitude >> exponent) & 0x0F)
    return (sign | code) ^ 0x55


def g711(samples: array, law: str) -> bytes:
    encode = _ulaw if law == "ulaw" else _alaw
    table = bytes(encode(v - 32768) for v in range(65536))
    return bytes(table[v + 32768] for v in samples)


def encode(samples: array, rate: int, fmt: str) -> tuple[bytes, int]:
    """The WAV as the bytes one format carries, and that format's bytes per second.

    ``pcm``/``pcm16``: 24 kHz int16 LE; ``pcmu``/``g711_ulaw``, ``pcma``/``g711_alaw``: 8 kHz.
    """
    if fmt in ("pcm", "pcm16"):
        pcm = resample(samples, rate, 24000)
        if sys.byteorder == "big":
            pcm.byteswap()
        return pcm.tobytes(), 48000
    law = {"pcmu": "ulaw", "g711_ulaw": "ulaw", "pcma": "alaw", "g711_alaw": "alaw"}[fmt]
    return g711(resample(samples, rate, 8000), law), 8000


def silence(fmt: str, seconds: float) -> bytes:
    if fmt in ("pcm", "pcm16"):
        return bytes(2 * int(24000 * seconds))
    byte = {"pcmu": 0xFF, "g711_ulaw": 0xFF, "pcma": 0xD5, "g711_alaw": 0xD5}[fmt]
    return bytes([byte]) * int(8000 * seconds)


async def paced(data: bytes, bytes_per_s: int, chunk_ms: int) -> AsyncIterator[tuple[bytes, float]]:
    """``(chunk, audio_time_s_at_its_end)`` in real time: chunk k leaves at start + k*chunk."""
    step = bytes_per_s * chunk_ms // 1000
    step -= step % 2
    start = time.monotonic()
    for k, at in enumerate(range(0, len(data), step)):
        delay = start + k * chunk_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = data[at : at + step]
        yield chunk, (at + len(chunk)) / bytes_per_s

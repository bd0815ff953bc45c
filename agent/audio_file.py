"""Decode an audio file (any container and codec PyAV reads) into 16 kHz mono float32.

The one decode path for everything that arrives as a file: HTTP uploads, base64 bodies,
downloaded URLs, the CLI and the Python client's test helpers. Any sample rate and channel
count goes through libswresample (``av.AudioResampler``), a real band-limited resampler and
down-mixer, never sample dropping. Synchronous and CPU-heavy: callers on an event loop run
it in a thread executor. A ``threading.Event`` lets the caller stop a decode it no longer
needs (the request went away), and the duration limit is enforced while decoding, so a
small file that expands to hours of audio is refused before it fills the memory.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt

from agent.errors import AudioInputError

SAMPLE_RATE = 16_000

Samples = npt.NDArray[np.float32]

#: Packets that fail to decode before the whole file is declared broken: a few damaged
#: frames in a long recording should not lose the rest of it.
_MAX_BAD_PACKETS = 32


@dataclass(frozen=True, eq=False)
class DecodedAudio:
    """A decoded file: mono float32 samples at ``rate`` plus what the source was."""

    samples: Samples
    rate: int
    source_rate: int
    source_channels: int
    codec: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate


def decode_audio(
    source: bytes | str | Path,
    max_duration_s: float | None = None,
    rate: int = SAMPLE_RATE,
    cancel: threading.Event | None = None,
) -> DecodedAudio:
    """Decode ``source`` (file bytes, or a local path) to mono float32 at ``rate``.

    Raises ``AudioInputError`` with code ``empty_audio`` (no bytes, or no samples),
    ``invalid_audio`` (not a decodable audio file), ``audio_too_long`` (over
    ``max_duration_s``), or ``cancelled`` when ``cancel`` was set.
    """
    if isinstance(source, bytes):
        if not source:
            raise AudioInputError("the audio file is empty (0 bytes)", "empty_audio")
        opened: str | io.BytesIO = io.BytesIO(source)
    else:
        opened = str(source)
    try:
        container = av.open(opened, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) and isinstance(opened, str):
            raise AudioInputError(f"no such file: {opened}", "invalid_audio") from None
        raise AudioInputError(
            f"cannot decode the audio: not a recognised audio file ({_reason(exc)})",
            "invalid_audio",
        ) from None
    with container:
        if not container.streams.audio:
            raise AudioInputError("the file has no audio stream", "invalid_audio")
        limit = _check_declared_duration(container, max_duration_s)
        stream = container.streams.audio[0]
        decoded = _decode_stream(container, stream, rate, limit, cancel)
    if not len(decoded):
        raise AudioInputError("the audio file contains no audio samples", "empty_audio")
    return DecodedAudio(
        samples=decoded,
        rate=rate,
        source_rate=int(stream.codec_context.sample_rate or 0),
        source_channels=int(stream.codec_context.channels or 0),
        codec=str(stream.codec_context.name),
    )


def read_audio(path: str | Path, rate: int = SAMPLE_RATE) -> Samples:
    """Decode a local file into mono float32 at ``rate`` (test and client convenience)."""
    return decode_audio(Path(path), rate=rate).samples


def _check_declared_duration(
    container: av.container.InputContainer, max_duration_s: float | None
) -> float | None:
    """Refuse early when the container itself declares a duration over the limit."""
    if max_duration_s is None:
        return None
    declared = container.duration  # in AV_TIME_BASE units (microseconds), or None
    if declared is not None and declared / 1_000_000 > max_duration_s * 1.02:
        raise _too_long(declared / 1_000_000, max_duration_s)
    return max_duration_s


def _decode_stream(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    rate: int,
    max_duration_s: float | None,
    cancel: threading.Event | None,
) -> Samples:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    max_samples = None if max_duration_s is None else int(max_duration_s * rate)
    chunks: list[Samples] = []
    total = 0
    bad = 0
    try:
        for packet in container.demux(stream):
            if cancel is not None and cancel.is_set():
                raise AudioInputError("decoding was cancelled", "cancelled")
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad += 1
                if bad > _MAX_BAD_PACKETS:
                    raise
                continue
            for frame in frames:
                for out in resampler.resample(frame):
                    chunks.append(_mono(out))
                    total += out.samples
            if max_samples is not None and total > max_samples:
                raise _too_long(total / rate, max_duration_s or 0.0)
        # The resampler holds a few ms of filter delay: flush it so the tail is not lost.
        for out in resampler.resample(None):
            chunks.append(_mono(out))
    except (av.error.FFmpegError, ValueError) as exc:
        raise AudioInputError(
            f"cannot decode the audio stream ({_reason(exc)})", "invalid_audio"
        ) from None
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _mono(frame: av.AudioFrame) -> Samples:
    return np.asarray(frame.to_ndarray(), dtype=np.float32).reshape(-1)


def _too_long(duration_s: float, limit_s: float) -> AudioInputError:
    return AudioInputError(
        f"the audio is longer than this server accepts ({duration_s:.0f} s > {limit_s:.0f} s, "
        "limits.max_audio_s)",
        "audio_too_long",
    )


def _reason(exc: BaseException) -> str:
    """FFmpeg's own short reason (``Invalid data found when processing input``)."""
    strerror = getattr(exc, "strerror", None)
    return str(strerror or exc).strip() or type(exc).__name__

"""Decode an audio file (one of a short list of audio containers) into 16 kHz mono float32.

The one decode path for everything that arrives as a file: HTTP uploads, base64 bodies,
downloaded URLs, the CLI and the Python client's test helpers. Any sample rate and channel
count goes through libswresample (``agent.audio_formats.resampler``), a real band-limited
resampler and down-mixer, never sample dropping. Synchronous and CPU-heavy: the server runs it in a
separate, memory-limited process (``agent.decoder_process``), the CLI in a thread.

The bytes are anyone's, and FFmpeg left to guess reads far more than audio: an ``ffconcat``
or HLS text names files on the server to read, an SDP text binds UDP ports. So the container
is sniffed here from its first bytes against :data:`ACCEPTED` and FFmpeg is told which
demuxer to use (never its guess), may open no protocol at all (every nested open fails),
and may run audio decoders only (no video decoder probes a stream of an MP4 or WebM). A
file's declared sample rate and channel count are checked before anything is decoded, and
each frame's duration against the limit before it is resampled, so a tiny file that claims
1 Hz or 100 MHz is refused instead of expanding into gigabytes or minutes of CPU.
"""

from __future__ import annotations

import functools
import io
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import numpy.typing as npt

from agent import audio_formats
from agent.errors import AudioInputError

SAMPLE_RATE = 16_000

Samples = npt.NDArray[np.float32]

#: The containers accepted, as an error message lists them: OpenAI's list (flac, mp3, mp4,
#: mpeg, mpga, m4a, ogg, wav, webm) and a few other plain audio containers.
ACCEPTED = "wav, flac, mp3 (mpga), ogg, webm (mkv, mka), mp4 (m4a, mov), aac (adts), aiff, caf, amr"

#: Sample rates and channel counts a real recording has; outside them a file is a trick.
MIN_RATE = 4_000
MAX_RATE = 384_000
MAX_CHANNELS = 64

#: Packets that fail to decode before the whole file is declared broken: a few damaged
#: frames in a long recording should not lose the rest of it.
_MAX_BAD_PACKETS = 32

#: WAVE format tags whose block is exactly one sample of every channel (PCM, float,
#: WAVE_FORMAT_EXTENSIBLE): any other ``block_align`` is a lie that sizes FFmpeg's packets.
_WAV_PCM_TAGS = frozenset({0x0001, 0x0003, 0xFFFE})

#: How far into a WAV its ``fmt `` chunk is looked for (after ``bext``, ``JUNK``, ``ds64``).
_WAV_HEADER_SCAN = 65_536


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


@dataclass(frozen=True, eq=False)
class DecodedChunks:
    """``decode_chunks``' result: the samples still in the pieces the resampler gave.

    The decoder process writes them to its pipe one by one, so it never holds two copies.
    """

    chunks: tuple[Samples, ...]
    rate: int
    source_rate: int
    source_channels: int
    codec: str

    @property
    def samples(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def joined(self) -> DecodedAudio:
        samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        return DecodedAudio(
            samples=samples.astype(np.float32, copy=False),
            rate=self.rate,
            source_rate=self.source_rate,
            source_channels=self.source_channels,
            codec=self.codec,
        )


def decode_audio(
    source: bytes | str | Path,
    max_duration_s: float | None = None,
    rate: int = SAMPLE_RATE,
    cancel: threading.Event | None = None,
) -> DecodedAudio:
    """Decode ``source`` (file bytes, or a local path) to mono float32 at ``rate``.

    Raises ``AudioInputError`` with code ``empty_audio`` (no bytes, or no samples),
    ``invalid_audio`` (not one of :data:`ACCEPTED`, an impossible header, undecodable),
    ``audio_too_long`` (over ``max_duration_s``), ``audio_too_complex`` (the decoder ran
    out of memory), or ``cancelled`` when ``cancel`` was set.
    """
    return decode_chunks(source, max_duration_s, rate, cancel).joined()


def decode_chunks(
    source: bytes | str | Path,
    max_duration_s: float | None = None,
    rate: int = SAMPLE_RATE,
    cancel: threading.Event | None = None,
) -> DecodedChunks:
    """``decode_audio`` without joining the pieces (see ``DecodedChunks``)."""
    if isinstance(source, bytes):
        file: BinaryIO = io.BytesIO(source)
    else:
        try:
            file = open(source, "rb")  # closed by the ``with`` below
        except OSError as exc:
            message = f"cannot read {source}: {exc.strerror}"
            raise AudioInputError(message, "invalid_audio") from None
    with file:
        demuxer = check_header(file)
        try:
            return _decode_file(file, demuxer, max_duration_s, rate, cancel)
        except MemoryError:
            # Under the decoder process's RLIMIT_AS (FFmpeg's ENOMEM is a MemoryError too).
            raise AudioInputError(
                "the audio needs more memory to decode than this server allows",
                "audio_too_complex",
            ) from None


def read_audio(path: str | Path, rate: int = SAMPLE_RATE) -> Samples:
    """Decode a local file into mono float32 at ``rate`` (test and client convenience)."""
    return decode_audio(Path(path), rate=rate).samples


# -- what the file is, before FFmpeg sees it --------------------------------------------------


def check_header(file: BinaryIO) -> str:
    """What can be refused from the first bytes alone: the container, a WAV's ``fmt ``.

    Returns the demuxer (``sniff``); cheap enough for an event loop (a few small reads).
    """
    demuxer = sniff(file)
    if demuxer == "wav":
        check_wav_header(file)
    return demuxer


def sniff(file: BinaryIO) -> str:
    """The FFmpeg demuxer for ``file`` from its first bytes; ``invalid_audio`` if none.

    Leaves ``file`` at its start.
    """
    head = file.read(16)
    if not head:
        raise AudioInputError("the audio file is empty (0 bytes)", "empty_audio")
    # FFmpeg skips ID3v2 tags before any demuxer; the container is what follows them.
    offset = 0
    for _ in range(8):
        size = id3v2_size(head)
        if not size:
            break
        offset += size
        file.seek(offset)
        head = file.read(16)
    file.seek(0)
    demuxer = sniff_format(head)
    if demuxer is None and offset:
        demuxer = "mp3"  # an ID3v2 tag is an MP3's header; its demuxer finds the first frame
    if demuxer is None:
        raise AudioInputError(
            f"not a supported audio file: the accepted formats are {ACCEPTED}", "invalid_audio"
        )
    return demuxer


def sniff_format(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file that starts with ``head`` (16 bytes will do), or None."""
    magic = head[:4]
    if magic in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if magic == b"fLaC":
        return "flac"
    if magic == b"OggS":
        return "ogg"
    if magic == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):  # ISO-BMFF / QuickTime
        return "mov"
    if magic == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if magic == b"caff":
        return "caf"
    if head.startswith(b"#!AMR"):  # AMR-NB and AMR-WB storage format
        return "amr"
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an audio frame sync
        if head[1] & 0x06 == 0:  # layer bits 00: an ADTS (AAC) header, not MPEG audio
            return "aac" if head[1] & 0xF0 == 0xF0 else None
        # MPEG audio layer I-III: a valid bitrate and sample-rate index too.
        if head[2] & 0xF0 != 0xF0 and head[2] & 0x0C != 0x0C:
            return "mp3"
    return None


def id3v2_size(head: bytes) -> int:
    """Bytes taken by an ID3v2 tag at the start of ``head`` (header and footer), else 0."""
    if len(head) < 10 or head[:3] != b"ID3" or any(b & 0x80 for b in head[6:10]):
        return 0
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    return 10 + size + (10 if head[5] & 0x10 else 0)


def check_wav_header(file: BinaryIO) -> None:
    """Refuse a WAV whose ``fmt `` chunk is impossible: its rate, channels or block size.

    FFmpeg trusts them: it sizes its packets by ``block_align`` and the resampler's output by
    the rate, so 48 kB claiming 1 Hz and 12 000-byte blocks decoded to gigabytes. A header
    not found in the first 64 kB is left to FFmpeg (the stream checks still apply). Leaves
    ``file`` at its start.
    """
    head = file.read(_WAV_HEADER_SCAN)
    file.seek(0)
    pos = 12  # after RIFF <size> WAVE
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk == b"fmt ":
            if size < 16 or pos + 24 > len(head):
                raise AudioInputError("the WAV header is cut short", "invalid_audio")
            tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
            check_format(rate, channels)
            if tag in _WAV_PCM_TAGS and (
                bits not in (8, 16, 24, 32, 64) or block_align != channels * bits // 8
            ):
                raise AudioInputError(
                    f"the WAV header is inconsistent: {block_align}-byte blocks for "
                    f"{channels} channel(s) of {bits}-bit samples",
                    "invalid_audio",
                )
            return
        pos += 8 + size + (size & 1)  # chunks are padded to an even size


def check_format(rate: int, channels: int) -> None:
    """Refuse a sample rate or channel count no recording has (``invalid_audio``)."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioInputError(
            f"the audio claims a sample rate of {rate} Hz; this server accepts "
            f"{MIN_RATE}-{MAX_RATE} Hz",
            "invalid_audio",
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioInputError(
            f"the audio claims {channels} channels; this server accepts 1-{MAX_CHANNELS}",
            "invalid_audio",
        )


# -- the one file read without FFmpeg --------------------------------------------------------


def read_pcm16_wav(data: bytes, max_duration_s: float | None = None) -> DecodedAudio | None:
    """A canonical 16 kHz mono 16-bit PCM WAV's samples, read here; ``None`` for anything else.

    What a gateway's remote engine sends (``agent.audio_formats.pcm16_wav``), one file per
    utterance: a decoder child for it costs ~0.19 s of CPU to start, and FFmpeg would only
    divide the integers by 32768, as this does (the same floats to the bit). Safe in the
    server process because nothing here is guessed or sized by the file beyond the checks:
    ``check_header`` first (its errors are the decoder's), then a plain ``RIFF``, a
    ``fmt `` of exactly PCM/1 channel/16 kHz/16 bits before a ``data`` chunk that lies
    whole inside the bytes already in memory. Any other file, or one that is odd in any
    way (a truncated or open-ended ``data``, no samples), goes to the decoder as before.
    Raises ``AudioInputError`` (``invalid_audio``, ``audio_too_long``).
    """
    file = io.BytesIO(data)
    if sniff_format(data[:16]) != "wav" or data[:4] != b"RIFF":
        return None
    check_header(file)
    fmt_ok = False
    pos = 12
    while pos + 8 <= len(data) and pos < _WAV_HEADER_SCAN:
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                return None
            tag, channels, rate, byte_rate, block_align, bits = struct.unpack_from(
                "<HHIIHH", data, body
            )
            fmt_ok = (tag, channels, rate, byte_rate, block_align, bits) == (
                0x0001,
                1,
                SAMPLE_RATE,
                SAMPLE_RATE * 2,
                2,
                16,
            )
            if not fmt_ok:
                return None
        elif chunk == b"data":
            if not fmt_ok or size == 0 or size % 2 or body + size > len(data):
                return None
            n = size // 2
            if max_duration_s is not None and n / SAMPLE_RATE > max_duration_s:
                raise _too_long(n / SAMPLE_RATE, max_duration_s)
            pcm = np.frombuffer(data, dtype="<i2", count=n, offset=body)
            samples = pcm.astype(np.float32) / np.float32(32768.0)
            return DecodedAudio(samples, SAMPLE_RATE, SAMPLE_RATE, 1, "pcm_s16le")
        pos = body + size + (size & 1)
    return None


# -- decoding ---------------------------------------------------------------------------------


def _decode_file(
    file: BinaryIO,
    demuxer: str,
    max_duration_s: float | None,
    rate: int,
    cancel: threading.Event | None,
) -> DecodedChunks:
    try:
        container = _open(file, demuxer)
    except MemoryError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise AudioInputError(
            f"cannot decode the audio: not a valid {demuxer} file ({_reason(exc)})",
            "invalid_audio",
        ) from None
    with container:
        if not container.streams.audio:
            raise AudioInputError("the file has no audio stream", "invalid_audio")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        # 0 means not known until the first frame, which is checked in its turn.
        if ctx.sample_rate or ctx.channels:
            check_format(ctx.sample_rate or MIN_RATE, ctx.channels or 1)
        limit = _check_declared_duration(container, max_duration_s)
        chunks = _decode_stream(container, stream, rate, limit, cancel)
        source_rate, source_channels, codec = int(ctx.sample_rate), int(ctx.channels), ctx.name
    if not sum(len(chunk) for chunk in chunks):
        raise AudioInputError("the audio file contains no audio samples", "empty_audio")
    return DecodedChunks(tuple(chunks), rate, source_rate, source_channels, str(codec))


def _open(file: BinaryIO, demuxer: str) -> av.container.InputContainer:
    """Open ``file`` with ``demuxer`` (never FFmpeg's guess), no protocols, audio decoders."""
    return av.open(
        file,
        mode="r",
        format=demuxer,
        metadata_errors="ignore",
        container_options={
            # The file itself comes through PyAV's in-memory I/O, which is no protocol: with
            # none allowed, anything the demuxer would open besides it (a playlist entry, an
            # MP4 data reference, a network stream) fails.
            "protocol_whitelist": "none",
            # Stream probing decodes a little of every stream: no video decoder runs on it.
            "codec_whitelist": _audio_decoders(),
        },
    )


@functools.cache
def _audio_decoders() -> str:
    """Every audio decoder in this FFmpeg, comma-separated (its ``codec_whitelist`` syntax)."""
    names = set()
    for name in av.codecs_available:
        try:
            codec = av.Codec(name, "r")
        except (av.error.FFmpegError, ValueError):
            continue  # an encoder only
        if codec.type == "audio":
            names.add(codec.name)
    return ",".join(sorted(names))


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
) -> list[Samples]:
    resampler = audio_formats.resampler(rate)
    chunks: list[Samples] = []
    seconds = 0.0
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
                # Before the resampler expands it: the frame's own rate says what it costs.
                check_format(frame.sample_rate, frame.layout.nb_channels)
                seconds += frame.samples / frame.sample_rate
                if max_duration_s is not None and seconds > max_duration_s:
                    raise _too_long(seconds, max_duration_s)
                chunks.extend(_mono(out) for out in resampler.resample(frame))
        # The resampler holds a few ms of filter delay: flush it so the tail is not lost.
        chunks.extend(_mono(out) for out in resampler.resample(None))
    except MemoryError:
        raise
    except (av.error.FFmpegError, ValueError) as exc:
        raise AudioInputError(
            f"cannot decode the audio stream ({_reason(exc)})", "invalid_audio"
        ) from None
    return chunks


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

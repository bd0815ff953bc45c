"""Decoding: every container the endpoint promises, any rate and channel count to 16 kHz
mono through a real resampler, and clear errors for empty, broken and too-long input; and
hostile input: only audio containers (sniffed here, never FFmpeg's guess), no protocol, and
impossible headers and over-long frames refused before they are decoded or resampled."""

from __future__ import annotations

import io
import struct
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest

from agent.audio_file import (
    ACCEPTED,
    MAX_CHANNELS,
    MAX_RATE,
    MIN_RATE,
    _open,
    check_format,
    check_wav_header,
    decode_audio,
    id3v2_size,
    read_audio,
    sniff,
    sniff_format,
)
from agent.errors import AudioInputError
from tests.conftest import BECKETT
from tests.support.audio_files import ENCODINGS, encode, wav_bytes


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


# -- hostile input: only audio containers, only audio, no impossible headers -----------------


def crafted_wav(
    rate: int,
    payload: bytes,
    channels: int = 1,
    bits: int = 16,
    block_align: int | None = None,
    riff_size: int | None = None,
    data_size: int | None = None,
) -> bytes:
    """A PCM WAV whose header says whatever it is told to (sizes default to the truth)."""
    align = channels * bits // 8 if block_align is None else block_align
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, rate, rate * align, align, bits)
    data = b"data" + struct.pack("<I", len(payload) if data_size is None else data_size)
    body = b"WAVE" + fmt + data + payload
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def _noise(size: int) -> bytes:
    return np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()


#: The three files of the report: tiny, and each once decoded to gigabytes or minutes.
WAV_BOMBS = {
    # 48 kB at 1 Hz with 12 000-byte blocks and lying sizes: 5 GB of resampler output.
    "1hz_12000_byte_blocks": crafted_wav(
        1, _noise(48_000 - 44), block_align=12_000, riff_size=0xFFFFFFFF, data_size=0xFFFFFFF0
    ),
    # 32 kB claiming 100 000 007 Hz: froze the event loop for 6 s.
    "100mhz": crafted_wav(100_000_007, _noise(32_000 - 44)),
    # 4 kB, honest, at 1 Hz: "68 minutes" of audio, 17 s of decoding.
    "honest_1hz": crafted_wav(1, _noise(4_000 - 44), bits=8),
}

#: Text that FFmpeg, left to guess, reads as a playlist or a network session description.
TEXT_TRICKS = {
    "ffconcat": f"ffconcat version 1.0\nfile {BECKETT}\n".encode(),
    "hls": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{BECKETT}\n".encode(),
    "sdp": b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 9 RTP/AVP 0\n",
    "text": b"this is not audio at all " * 20,
}


@pytest.mark.parametrize("name", sorted(TEXT_TRICKS))
def test_only_audio_containers_are_opened(name: str, tmp_path: Path) -> None:
    """A playlist or SDP is refused before FFmpeg sees it, as bytes and as a local path."""
    path = tmp_path / "a.wav"
    path.write_bytes(TEXT_TRICKS[name])
    for source in (TEXT_TRICKS[name], path):
        with pytest.raises(AudioInputError) as info:
            decode_audio(source)
        assert info.value.code == "invalid_audio"
        assert f"accepted formats are {ACCEPTED}" in str(info.value)


def test_a_forced_playlist_still_opens_no_file() -> None:
    """The second guard: even a demuxer that opens other resources may use no protocol."""
    data = f"ffconcat version 1.0\nfile {BECKETT}\n".encode()
    with pytest.raises(av.error.FFmpegError):
        with _open(io.BytesIO(data), "concat") as container:
            for _ in container.demux():
                pass


@pytest.mark.parametrize(
    ("head", "demuxer"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "wav"),
        (b"RF64\xff\xff\xff\xffWAVEds64", "wav"),
        (b"fLaC\x00\x00\x00\x22", "flac"),
        (b"OggS\x00\x02\x00\x00", "ogg"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "matroska"),
        (b"\x00\x00\x00\x1cftypM4A \x00\x00", "mov"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00", "mov"),
        (b"FORM\x00\x00\x10\x00AIFFCOMM", "aiff"),
        (b"FORM\x00\x00\x10\x00AIFCFVER", "aiff"),
        (b"caff\x00\x01\x00\x00desc", "caf"),
        (b"#!AMR\n\x3c", "amr"),
        (b"#!AMR-WB\n", "amr"),
        (b"\xff\xfb\x90\x64\x00\x00", "mp3"),  # MPEG-1 layer III
        (b"\xff\xfd\xe0\x04\x98\x66", "mp3"),  # MPEG-1 layer II
        (b"\xff\xf1\x50\x80\x23\x7f", "aac"),  # ADTS
        (b"\xff\xfb\xf0\x64", None),  # a bad bitrate index: not a frame
        (b"\xff\xe1\x50\x80", None),  # layer 00 without the 12-bit ADTS sync
        (b"ffconcat version 1.0\n", None),
        (b"#EXTM3U\n", None),
        (b"v=0\r\no=- 0 0 IN IP4", None),
        (b"RIFF\x24\x00\x00\x00AVI LIST", None),
        (b"\x00\x00\x01\xba\x44\x00", None),  # MPEG-PS: not on the list
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, demuxer: str | None) -> None:
    assert sniff_format(head) == demuxer


@pytest.mark.parametrize("kind", sorted(ENCODINGS))
def test_sniffing_recognises_every_encoded_kind(
    kind: str, beckett_audio: npt.NDArray[np.float32]
) -> None:
    data = encode(beckett_audio[:16_000], kind)
    demuxer = {"m4a": "mov", "webm": "matroska"}.get(kind, kind)
    assert sniff(io.BytesIO(data)) == demuxer


def test_id3_tags_are_skipped_to_the_container(beckett_audio: npt.NDArray[np.float32]) -> None:
    """An ID3v2 tag names no container: what follows it decides (FFmpeg skips it too)."""
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 1, 0]) + b"\x00" * 128  # a 128-byte tag
    assert id3v2_size(tag) == 138
    flac = tag + encode(beckett_audio[:16_000], "flac")
    assert sniff(io.BytesIO(flac)) == "flac"
    assert decode_audio(flac).duration_s == pytest.approx(1.0, abs=0.01)
    assert sniff(io.BytesIO(tag + b"\x00" * 64)) == "mp3"  # the MP3 demuxer finds the frames
    assert sniff(io.BytesIO(tag + TEXT_TRICKS["ffconcat"])) == "mp3"  # and finds none here


@pytest.mark.parametrize("name", sorted(WAV_BOMBS))
def test_wav_bombs_are_refused_before_decoding(name: str) -> None:
    before = time.process_time()
    with pytest.raises(AudioInputError) as info:
        decode_audio(WAV_BOMBS[name], max_duration_s=7200)
    assert info.value.code == "invalid_audio"
    assert "sample rate" in str(info.value) and "4000-384000 Hz" in str(info.value)
    assert time.process_time() - before < 0.5


@pytest.mark.parametrize(
    ("wav", "words"),
    [
        (crafted_wav(16_000, bytes(3200), block_align=12_000), "12000-byte blocks"),
        (crafted_wav(16_000, bytes(3200), bits=12), "12-bit samples"),
        (crafted_wav(16_000, bytes(3200), channels=0, block_align=2), "0 channels"),
        (crafted_wav(16_000, bytes(3200), channels=65), "65 channels"),
        (crafted_wav(3_999, bytes(3200)), "3999 Hz"),
        (crafted_wav(384_001, bytes(3200)), "384001 Hz"),
    ],
)
def test_impossible_wav_headers_are_refused(wav: bytes, words: str) -> None:
    with pytest.raises(AudioInputError) as info:
        check_wav_header(io.BytesIO(wav))
    assert info.value.code == "invalid_audio" and words in str(info.value)


def test_the_header_checks_accept_the_edges() -> None:
    for rate in (MIN_RATE, MAX_RATE):
        check_wav_header(io.BytesIO(crafted_wav(rate, bytes(3200))))
    check_wav_header(io.BytesIO(crafted_wav(48_000, bytes(3200), channels=8, bits=24)))
    check_format(MAX_RATE, MAX_CHANNELS)


def aiff_claiming(rate_80bit: bytes) -> bytes:
    """0.1 s of 16 kHz AIFF whose COMM chunk then claims another rate (80-bit float)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="aiff") as out:
        stream = out.add_stream("pcm_s16be", rate=16_000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), "s16", "mono")
        frame.sample_rate = 16_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    data = bytearray(buf.getvalue())
    comm = data.index(b"COMM")
    data[comm + 16 : comm + 26] = rate_80bit
    return bytes(data)


#: An AIFF at 1 Hz: no WAV header to read, so only FFmpeg's figure can refuse it.
AIFF_1HZ = aiff_claiming(b"\x3f\xff\x80\x00\x00\x00\x00\x00\x00\x00")


def test_the_stream_header_is_checked_in_other_containers() -> None:
    """AIFF declares its own rate: FFmpeg's figure is checked after opening, before decoding."""
    with pytest.raises(AudioInputError) as info:
        decode_audio(AIFF_1HZ)
    assert info.value.code == "invalid_audio" and "1 Hz" in str(info.value)


def lying_mp3(loud_s: float = 1.0, quiet_s: float = 30.0) -> bytes:
    """An MP3 that FFmpeg estimates at a fraction of its length: no Xing header, and its
    first frames (160 kbit/s) set the bitrate it divides the size by (the rest: 8 kbit/s)."""
    return _mp3(loud_s, 160_000) + _mp3(quiet_s, 8_000)


def _mp3(seconds: float, bit_rate: int) -> bytes:
    buf = io.BytesIO()
    options = {"write_xing": "0", "id3v2_version": "0"}
    with av.open(buf, "w", format="mp3", options=options) as out:
        stream = out.add_stream("libmp3lame", rate=16_000)
        stream.layout = "mono"
        stream.bit_rate = bit_rate
        ctx = stream.codec_context
        t = np.arange(int(16_000 * seconds)) / 16_000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16_000
        resampler = av.AudioResampler(
            format=ctx.format.name, layout="mono", rate=16_000, frame_size=ctx.frame_size
        )
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_each_frame_is_checked_before_it_is_resampled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file longer than it declares is stopped at the limit: no sample past it reaches
    the resampler (which is where a frame's cost multiplies)."""
    data = lying_mp3()
    with av.open(io.BytesIO(data), format="mp3") as container:
        assert container.duration is not None and container.duration < 6_000_000  # "4.6 s"
    resampled = 0
    real = av.AudioResampler

    class Counting:
        def __init__(self, **kwargs: Any) -> None:
            self._inner = real(**kwargs)

        def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
            nonlocal resampled
            resampled += 0 if frame is None else frame.samples
            return self._inner.resample(frame)

    monkeypatch.setattr(av, "AudioResampler", Counting)
    with pytest.raises(AudioInputError) as info:
        decode_audio(data, max_duration_s=10.0)
    assert info.value.code == "audio_too_long"
    assert 0 < resampled <= 10 * 16_000


def test_a_local_path_goes_through_the_same_checks(tmp_path: Path) -> None:
    path = tmp_path / "bomb.wav"
    path.write_bytes(WAV_BOMBS["honest_1hz"])
    with pytest.raises(AudioInputError) as info:
        decode_audio(path)
    assert info.value.code == "invalid_audio"
    with pytest.raises(AudioInputError) as info:
        decode_audio(tmp_path / "missing.wav")
    assert info.value.code == "invalid_audio" and "No such file" in str(info.value)
    assert read_audio(BECKETT).dtype == np.float32

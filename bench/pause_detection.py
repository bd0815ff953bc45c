"""When does the final decode start? Pause detection with and without looks between windows.

Runs a WAV through the audio path of a live call (16 kHz s16 frames of 20 ms into aiortc's
Opus encoder, its decoder, then the server's resampler to 16 kHz mono), then through the
server's detector packet by packet, twice: with looks between VAD windows (``speculative``, on
whenever speculative finals are) and with whole windows only. Deterministic: no clock, no
server, no engine::

    .venv/bin/python bench/pause_detection.py --audio /tmp/joined-20s.wav

Reported per utterance: the end of speech and, for each mode, the audio time from it to the
pause that started the final's speculative decode (what the server reports as
``timings.decode_after_ms``), plus the lowest look probability heard in the 32 ms after the
end (why a look did or did not fire: it pauses below ``threshold - 0.15``). Per mode:
pauses (speculative decodes started), withdrawals (speech resumed: decodes wasted), VAD steps
and the CPU time they took per second of audio.
"""

from __future__ import annotations

import argparse
import fractions
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame

from agent.config import SegmenterConfig, VadConfig
from agent.detector import SpeechDetector
from agent.segmenter import SegmenterOptions, SpeechPaused, SpeechResumed, Utterance
from agent.transports.webrtc_audio import SAMPLE_RATE
from agent.vad import WINDOW_MS, SileroVad, VadStream
from bench.common import (
    REPO_ROOT,
    machine_info,
    markdown_table,
    save_results,
    shown_path,
    summarize,
)
from voxtral_rtc_client import FRAME_MS, read_audio

Samples = npt.NDArray[np.float32]
FRAME = SAMPLE_RATE * FRAME_MS // 1000


def through_opus(samples: Samples) -> list[Samples]:
    """The 16 kHz chunks a server receives for ``samples`` sent over Opus, one per packet."""
    encoder, decoder = OpusEncoder(), OpusDecoder()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
    pcm = np.concatenate([pcm, np.zeros(SAMPLE_RATE, np.int16)])  # a second of silence after
    chunks: list[Samples] = []
    for pos in range(0, len(pcm) - FRAME + 1, FRAME):
        frame = av.AudioFrame.from_ndarray(
            pcm[pos : pos + FRAME].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = SAMPLE_RATE, pos
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            for decoded in decoder.decode(JitterFrame(payload, timestamp)):
                assert isinstance(decoded, av.AudioFrame)
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(decoded)]
    return chunks


class MeteredStream(VadStream):
    """A VAD stream that times its steps and keeps each look's probability by audio time."""

    def __init__(self, inner: VadStream) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.windows = 0
        self.looks: list[tuple[float, float]] = []  # (audio ms at the look, probability)
        self.heard_ms = 0.0  # set by the caller before each chunk is processed

    def probability(self, window: Samples) -> float:
        t0 = time.perf_counter()
        p = self.inner.probability(window)
        self.seconds += time.perf_counter() - t0
        self.windows += 1
        return p

    def peek(self, recent: Samples) -> float:
        t0 = time.perf_counter()
        p = self.inner.peek(recent)
        self.seconds += time.perf_counter() - t0
        self.looks.append((self.heard_ms, p))
        return p

    def reset(self) -> None:
        self.inner.reset()


@dataclass
class ModeResult:
    between_windows: bool
    ends_ms: list[int] = field(default_factory=list)
    decode_after_ms: list[int] = field(default_factory=list)
    pauses: int = 0
    withdrawn: int = 0
    windows: int = 0
    looks: list[tuple[float, float]] = field(default_factory=list)
    vad_seconds: float = 0.0


def run_mode(chunks: list[Samples], options: SegmenterOptions, between_windows: bool) -> ModeResult:
    stream = MeteredStream(SileroVad().stream())
    detector = SpeechDetector(stream, options, speculative=between_windows)
    result = ModeResult(between_windows)
    pause_at: dict[int, int] = {}
    heard = 0
    for chunk in chunks:
        heard += len(chunk)
        stream.heard_ms = heard * 1000 / SAMPLE_RATE
        for ev in detector.process(chunk):
            if isinstance(ev, SpeechPaused):
                pause_at[ev.index] = ev.at_ms
                result.pauses += 1
            elif isinstance(ev, SpeechResumed):
                result.withdrawn += 1
            elif isinstance(ev, Utterance) and ev.cut == "silence":
                result.ends_ms.append(ev.end_ms)
                result.decode_after_ms.append(pause_at[ev.index] - ev.end_ms)
    result.windows, result.looks, result.vad_seconds = stream.windows, stream.looks, stream.seconds
    return result


def lowest_look_after(looks: list[tuple[float, float]], end_ms: int) -> float | None:
    near = [p for at, p in looks if end_ms < at <= end_ms + WINDOW_MS]
    return min(near) if near else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--audio", type=Path, default=REPO_ROOT / "tests" / "data" / "beckett.wav")
    parser.add_argument(
        "--no-opus", action="store_true", help="feed the file's own samples in 20 ms chunks"
    )
    args = parser.parse_args(argv)
    samples = read_audio(args.audio)
    if args.no_opus:
        chunks = [samples[i : i + FRAME] for i in range(0, len(samples), FRAME)]
    else:
        chunks = through_opus(samples)
    options = SegmenterOptions.from_config(VadConfig(), SegmenterConfig())
    grid, looked = (run_mode(chunks, options, early) for early in (False, True))
    audio_s = sum(len(c) for c in chunks) / SAMPLE_RATE

    rows: list[list[Any]] = []
    for k, end in enumerate(looked.ends_ms):
        grid_after = grid.decode_after_ms[grid.ends_ms.index(end)] if end in grid.ends_ms else "—"
        low = lowest_look_after(looked.looks, end)
        rows.append(
            [k, end, grid_after, looked.decode_after_ms[k], "—" if low is None else f"{low:.3f}"]
        )
    mode_rows = [
        [
            "looks between windows" if m.between_windows else "whole windows only",
            summarize(m.decode_after_ms).cell(),
            m.pauses,
            m.withdrawn,
            m.windows,
            len(m.looks),
            f"{m.vad_seconds / audio_s * 1000:.2f}",
        ]
        for m in (grid, looked)
    ]
    source = "the file's samples" if args.no_opus else "aiortc Opus encode + decode"
    markdown = "\n".join(
        [
            "# Pause detection (bench/pause_detection.py)",
            "",
            f"- audio: {shown_path(args.audio)} ({audio_s:.2f} s with 1 s of silence after), "
            f"via {source}; VAD Silero, threshold {options.turns.threshold}, silence below "
            f"{options.turns.neg_threshold:.2f}, hangover {options.turns.min_silence_ms} ms",
            "",
            markdown_table(
                (
                    "mode",
                    "end → final decode starts, ms p50 / p95 (audio)",
                    "pauses (speculative decodes)",
                    "withdrawn (speech resumed)",
                    "VAD windows",
                    "VAD looks",
                    "VAD CPU ms per s of audio",
                ),
                mode_rows,
            ),
            "",
            markdown_table(
                (
                    "utterance",
                    "end of speech, ms",
                    "decode starts, windows only",
                    "decode starts, with looks",
                    "lowest look in the 32 ms after the end",
                ),
                rows,
            ),
        ]
    )
    print(markdown)
    data = {
        "benchmark": "pause_detection",
        "command": shlex.join([shown_path(Path(sys.executable)), *sys.argv]),
        "machine": machine_info(),
        "audio": {"path": shown_path(args.audio), "seconds": round(audio_s, 2), "via": source},
        "modes": [
            {
                "between_windows": m.between_windows,
                "ends_ms": m.ends_ms,
                "decode_after_ms": m.decode_after_ms,
                "pauses": m.pauses,
                "withdrawn": m.withdrawn,
                "windows": m.windows,
                "looks": len(m.looks),
                "vad_seconds": round(m.vad_seconds, 4),
            }
            for m in (grid, looked)
        ],
        "utterances": rows,
    }
    json_path, md_path = save_results("pause_detection", data, markdown)
    print(f"saved {shown_path(json_path)}\nsaved {shown_path(md_path)}")


if __name__ == "__main__":
    main()

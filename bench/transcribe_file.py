"""File transcription speed: audio seconds transcribed per wall second (x real time).

Runs the path that ``POST /v1/audio/transcriptions`` and ``voxtral-rtc transcribe`` share,
in process, on two-minute files built from ``tests/data/beckett.wav``::

    .venv/bin/python bench/transcribe_file.py --repeat 3

Files (16 kHz mono WAV bytes, rebuilt every run, identical between runs):

* ``gaps``: 8 readings of beckett.wav separated by 1, 3, 6 and 10 s of silence (119.7 s;
  the integration test's file, 48 phrases, a third of it silence);
* ``dense``: 12 readings separated by 0.4, 1.0 and 1.6 s (131.5 s, 72 phrases).

Modes: ``packed`` (json / text: speech regions packed into pieces of up to 30 s) and
``per_phrase`` (verbose_json / srt / vtt: one engine request per speech region, for
per-phrase timestamps). Each run times decode (WAV bytes -> 16 kHz float32), the VAD + plan
and the transcription through one ``EngineWorker`` (loaded and warmed up once, before the
clock starts); the figure is the median of ``--repeat`` runs of the whole thing. The phrase
recall (reference phrases found in the output / expected) shows what speed costs in words.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.audio_file import decode_audio, read_audio
from agent.config import Config, load_config
from agent.engines.worker import EngineWorker
from agent.file_transcriber import FileTranscriber, TranscribeOptions
from agent.vad import create_vad
from bench.common import REPO_ROOT, machine_info, markdown_table, save_results
from bench.speech import BECKETT, BECKETT_PHRASES
from voxtral_rtc_client.audio import wav_bytes
from voxtral_rtc_client.text import normalise

FILES = {"gaps": (8, (1.0, 3.0, 6.0, 10.0)), "dense": (12, (0.4, 1.0, 1.6))}
MODES = {"packed": False, "per_phrase": True}


def build_file(readings: int, gaps_s: tuple[float, ...]) -> bytes:
    speech = read_audio(BECKETT)
    parts: list[npt.NDArray[np.float32]] = []
    for k in range(readings):
        parts += [speech, np.zeros(int(gaps_s[k % len(gaps_s)] * 16_000), dtype=np.float32)]
    return wav_bytes(np.concatenate(parts))


async def one_run(
    config: Config, worker: EngineWorker, data: bytes, timestamps: bool, readings: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-job")
    try:
        vad = await loop.run_in_executor(executor, create_vad, config.vad)
        transcriber = FileTranscriber.from_config(worker, vad, config, executor)
        options = TranscribeOptions(timestamps=timestamps)
        t0 = time.perf_counter()
        decoded = await loop.run_in_executor(executor, decode_audio, data)
        t1 = time.perf_counter()
        plan = await transcriber.plan(decoded.samples, options)
        t2 = time.perf_counter()
        transcript = await transcriber.collect(decoded.samples, plan, options)
        t3 = time.perf_counter()
    finally:
        executor.shutdown(wait=True)
    text = normalise(transcript.text)
    found = sum(min(text.count(p), readings) for p in BECKETT_PHRASES)
    return {
        "audio_s": round(decoded.duration_s, 3),
        "wall_s": round(t3 - t0, 3),
        "decode_s": round(t1 - t0, 3),
        "vad_plan_s": round(t2 - t1, 3),
        "transcribe_s": round(t3 - t2, 3),
        "pieces": len(plan.pieces),
        "speed_x": round(decoded.duration_s / (t3 - t0), 2),
        "phrase_recall": round(found / (readings * len(BECKETT_PHRASES)), 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config, environ={})
    load_before = os.getloadavg()
    worker = await EngineWorker.start(config.engine)
    results: dict[str, Any] = {}
    try:
        for file_name in args.files:
            readings, gaps = FILES[file_name]
            data = build_file(readings, gaps)
            for mode in args.modes:
                runs = [
                    await one_run(config, worker, data, MODES[mode], readings)
                    for _ in range(args.repeat)
                ]
                median = statistics.median(r["wall_s"] for r in runs)
                results[f"{file_name}/{mode}"] = {
                    "file": file_name,
                    "mode": mode,
                    "runs": runs,
                    "audio_s": runs[0]["audio_s"],
                    "median_wall_s": round(median, 3),
                    "median_speed_x": round(runs[0]["audio_s"] / median, 2),
                }
                print(f"{file_name}/{mode}: {runs[0]['audio_s'] / median:.2f} x real time")
    finally:
        await worker.close()
    return {
        "engine": worker.engine.name,
        "engine_config": {
            "beam_size": config.engine.beam_size,
            "cpu_threads": config.engine.cpu_threads,
            "max_batch": config.engine.max_batch,
        },
        "repeat": args.repeat,
        "machine": machine_info(),
        # Other work on the machine slows the runs down: the 1-minute load average.
        "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }


def to_markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in data["results"].values():
        runs = r["runs"]
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs)
        rows.append(
            [
                r["file"],
                r["mode"],
                f"{r['audio_s']:.1f}",
                runs[0]["pieces"],
                f"{r['median_wall_s']:.1f} ({walls})",
                f"**{r['median_speed_x']:.1f}x**",
                f"{statistics.median(x['decode_s'] for x in runs):.2f}",
                f"{statistics.median(x['vad_plan_s'] for x in runs):.2f}",
                f"{statistics.median(x['transcribe_s'] for x in runs):.1f}",
                f"{min(x['phrase_recall'] for x in runs):.3f}",
            ]
        )
    headers = [
        "file", "mode", "audio s", "pieces", "wall s: median (runs)", "audio s / wall s",
        "decode s", "VAD + plan s", "engine s", "phrase recall (min)",
    ]  # fmt: skip
    cfg = data["engine_config"]
    machine = data["machine"]
    note = (
        f"Engine {data['engine']} (beam {cfg['beam_size']}, {cfg['cpu_threads']} CPU thread, "
        f"max_batch {cfg['max_batch']}); median of {data['repeat']} runs; "
        f"{machine['cpu_model']}, {machine['cpu_affinity']} cores usable; 1-minute load "
        f"average {data['loadavg_1m'][0]} before, {data['loadavg_1m'][1]} after."
    )
    return markdown_table(headers, rows) + "\n\n" + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median taken)")
    parser.add_argument("--files", nargs="+", choices=sorted(FILES), default=["gaps", "dense"])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--config", help="YAML configuration (default: built-in defaults)")
    args = parser.parse_args()
    data = asyncio.run(asyncio.wait_for(run(args), timeout=1800))
    markdown = to_markdown(data)
    print(markdown)
    json_path, md_path = save_results("transcribe_file", data, markdown)
    print(f"saved {json_path.relative_to(REPO_ROOT)} and {md_path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()

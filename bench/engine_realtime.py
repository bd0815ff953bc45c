"""Voxtral Realtime engine speed: one batched step for N streams, against transformers.

No weights can be downloaded here, so the model has random weights (Voxtral Mini 4B
Realtime's shape in bf16 on CUDA; the tiny fixture with ``--tiny``): the work per step is the
real model's, only the words are nonsense. ::

    .venv/bin/python bench/engine_realtime.py            # 4 B shape, bf16, CUDA, 1 … 512
    .venv/bin/python bench/engine_realtime.py --tiny     # tiny random model on the CPU
    .venv/bin/python bench/engine_realtime.py --tiny --compile   # compiled per bucket

Reported (milliseconds):

* step time vs number of streams: one ``BatchedRealtime.step`` for N streams that all have
  their next 80 ms frame (log-mel, conv stem, encoder, projector, decoder, argmax, the token
  back on the host), p50 / p95 over ``--steps`` steps after ``--warm`` steps, with the
  streams ``--context-s`` seconds into their audio (rings that full);
* streams held in real time: the largest N whose p95 step is at most 80 ms;
* first-token latency: from the push that completes a new stream's first chunk to its first
  token, through the engine's thread, the engine otherwise idle (compute only: the text of
  audio at t needs t + delay of audio first, 480 ms by default);
* transformers' streaming ``generate`` for one stream in the same run (ms per token): what a
  stream costs without our batching.

With ``--compile`` (``engine.compile``) the step is compiled once per batch-size bucket by
the engine's ``warmup()`` before anything is timed (its time is the start-up's ``compile``
figure); N streams then run in the bucket at or above N.

Where N streams do not fit in memory, the row says so (``OOM``) and the sweep stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to fetch

import torch

from agent.config import EngineConfig
from agent.engines.base import StreamText
from agent.engines.voxtral_realtime import RealtimeOptions, VoxtralRealtimeEngine
from agent.engines.voxtral_realtime_fixture import (
    build_tiny_voxtral_realtime,
    full_size_voxtral_realtime,
)
from agent.engines.voxtral_realtime_streams import CHUNK_SAMPLES, LEFT_PAD_TOKENS, StreamAudio
from bench.common import RESULTS_DIR, machine_info, markdown_table, save_results, summarize

SR = 16_000
FRAME_MS = 80


def audio(seconds: float, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.2 * np.sin(2 * np.pi * (220 + 30 * seed) * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def build(args: argparse.Namespace, workdir: Path) -> tuple[VoxtralRealtimeEngine, float, float]:
    """The engine, its load time and its warm-up time (every bucket compiled, if so)."""
    started = time.perf_counter()
    streams = max(args.streams)
    if args.tiny:
        folder = build_tiny_voxtral_realtime(workdir / "tiny")
        config = EngineConfig(
            kind="voxtral_realtime",
            model=str(folder),
            device="cpu",
            max_streams=streams,
            compile=args.compile,
        )
        engine = VoxtralRealtimeEngine(config)
    else:
        model, processor = full_size_voxtral_realtime("cuda", torch.bfloat16)
        config = EngineConfig(
            kind="voxtral_realtime", device="cuda", max_streams=streams, compile=args.compile
        )
        options = RealtimeOptions(decoder_context=args.decoder_context)
        engine = VoxtralRealtimeEngine(config, options, model=model, processor=processor)
    loaded = time.perf_counter()
    engine.warmup()
    return engine, loaded - started, time.perf_counter() - loaded


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(engine: VoxtralRealtimeEngine, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """N streams at ``context_s`` into their audio, then timed steps with all N active."""
    batch = engine._batch
    d = 6
    prompt = [engine._bos] + [engine._pad] * (LEFT_PAD_TOKENS + d)
    first = StreamAudio(d)
    first.push(audio(1.0, 0))
    padded = torch.from_numpy(np.stack([first.take_first()] * n))
    tokens = batch.prefill(list(range(n)), padded, torch.tensor([prompt] * n), d)
    base = LEFT_PAD_TOKENS + d + 1
    # Skip ahead to context_s seconds in: the ring entries are what the attention reads.
    k0 = int(args.context_s * 1000 / FRAME_MS)
    active = torch.ones(n, dtype=torch.bool)
    chunk = torch.from_numpy(np.stack([audio(0.105, i)[:CHUNK_SAMPLES] for i in range(n)]))
    delays = torch.full((n,), d, dtype=torch.long)
    times: list[float] = []
    for i in range(args.warm + args.steps):
        position = base + k0 + i
        dec_pos = torch.full((n,), position, dtype=torch.long)
        enc_pos = dec_pos * batch.downsample
        _sync()
        started = time.perf_counter()
        tokens = batch.step(active, chunk, tokens.cpu(), enc_pos, dec_pos, delays)
        tokens.tolist()  # the tokens reach the host: the step is over
        elapsed = (time.perf_counter() - started) * 1000
        if i >= args.warm:
            times.append(elapsed)
    summary = summarize(times)
    return {"streams": n, "step_ms": summary.__dict__, "real_time": (summary.p95 or 1e9) <= 80}


def first_token_ms(engine: VoxtralRealtimeEngine, repeat: int) -> dict[str, Any]:
    samples: list[float] = []
    for i in range(repeat):
        got = threading.Event()
        at: list[float] = []

        def on_update(update: StreamText, at: list[float] = at, got: threading.Event = got) -> None:
            if not at:
                at.append(time.perf_counter())
                got.set()

        stream = engine.open_stream(on_update)
        clip = audio(1.0, i)
        needed = StreamAudio(stream.delay_ms // FRAME_MS).first_samples
        stream.push(clip[: needed - 1])
        time.sleep(0.05)
        started = time.perf_counter()
        stream.push(clip[needed - 1 : needed])
        got.wait(60)
        stream.close()
        samples.append((at[0] - started) * 1000)
    return summarize(samples).__dict__


def transformers_ms_per_token(engine: VoxtralRealtimeEngine, seconds: float) -> dict[str, Any]:
    model, processor = engine._model, engine._processor
    framing = StreamAudio(6)
    framing.push(audio(seconds, 3))
    framing.flush()
    first = framing.take_first()[LEFT_PAD_TOKENS * 1280 :]
    inputs = processor(first, is_streaming=True, is_first_audio_chunk=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    chunks = []
    while framing.ready():
        feats = processor(
            framing.take_next(), is_streaming=True, is_first_audio_chunk=False, return_tensors="pt"
        )["input_features"]
        chunks.append(feats.to(model.device, model.dtype))

    def features() -> Any:
        yield inputs["input_features"].to(model.dtype)
        yield from chunks

    _sync()
    started = time.perf_counter()
    out = model.generate(
        input_ids=inputs["input_ids"], input_features=features(), num_delay_tokens=6
    )
    _sync()
    elapsed = (time.perf_counter() - started) * 1000
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    return {
        "tokens": generated,
        "total_ms": round(elapsed, 1),
        "ms_per_token": round(elapsed / generated, 2),
    }


def render(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"# Voxtral Realtime engine — {setup['model']} on {setup['device_name']}",
        "",
        f"dtype {setup['dtype']}, {setup['parameters'] / 1e6:.1f} M parameters, load "
        f"{setup['startup_s']} s, warm-up {setup['warmup_s']} s, step "
        + (f"compiled for {setup['buckets']} rows" if setup["compiled"] else "eager")
        + f", streams {setup['context_s']} s into their audio, {setup['torch_threads']} torch "
        f"threads, torch {setup['torch']}, transformers {setup['transformers']}.",
        "",
    ]
    rows = []
    for row in report["steps"]:
        if "error" in row:
            rows.append([row["streams"], row["error"], "—", "—"])
            continue
        s = row["step_ms"]
        per = s["p50"] / row["streams"]
        rows.append(
            [
                row["streams"],
                f"{s['p50']} / {s['p95']}",
                f"{per:.2f}",
                "yes" if row["real_time"] else "no",
            ]
        )
    lines.append(markdown_table(["streams", "step ms p50 / p95", "ms per stream", "≤ 80 ms"], rows))
    lines += [
        "",
        f"Streams held in real time (p95 step ≤ 80 ms): **{report['held']}**",
        f"First token after its chunk is in (compute only), ms p50 / p95: "
        f"{report['first_token_ms']['p50']} / {report['first_token_ms']['p95']}",
        f"transformers streaming generate, one stream: {report['transformers']['ms_per_token']} ms "
        f"per token ({report['transformers']['tokens']} tokens)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU")
    p.add_argument("--streams", type=int, nargs="+", help="stream counts to time")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--context-s", type=float, default=10.0, help="seconds into the streams")
    p.add_argument("--decoder-context", type=int, default=0, help="decoder ring (0: model's)")
    p.add_argument(
        "--compile", action="store_true", help="compile the step per bucket (engine.compile)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.streams is None:
        args.streams = [1, 2, 4, 8] if args.tiny else [1, 8, 32, 64, 128, 256, 512]
    if not args.tiny and not torch.cuda.is_available():
        p.error("the full-size benchmark needs a CUDA GPU (or pass --tiny)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-realtime-") as workdir:
        engine, startup_s, warmup_s = build(args, Path(workdir))
        model = engine._model
        device = model.device
        steps: list[dict[str, Any]] = []
        for n in sorted(args.streams):
            try:
                steps.append(step_times(engine, n, args))
            except torch.OutOfMemoryError:
                steps.append({"streams": n, "error": "OOM"})
                torch.cuda.empty_cache()
                break
        held = max((r["streams"] for r in steps if r.get("real_time")), default=0)
        report: dict[str, Any] = {
            "setup": {
                "model": "tiny random Voxtral Realtime"
                if args.tiny
                else "Voxtral Mini 4B Realtime shape, random",
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else "CPU",
                "dtype": str(model.dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters()),
                "startup_s": round(startup_s, 2),
                "warmup_s": round(warmup_s, 2),
                "context_s": args.context_s,
                "decoder_ring": engine._batch.dec.size,
                "encoder_ring": engine._batch.enc.size,
                "compiled": engine._batch.compiled,
                "buckets": list(engine._batch.buckets),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "torch_threads": torch.get_num_threads(),
            },
            "machine": machine_info(),
            "steps": steps,
            "held": held,
            "first_token_ms": first_token_ms(engine, 5),
            "transformers": transformers_ms_per_token(engine, 4.0),
        }
        engine.close()
    markdown = render(report)
    print(markdown)
    if not args.no_save:
        name = "engine-realtime-tiny" if args.tiny else "engine-realtime"
        name += "-compiled" if args.compile else ""
        for path in save_results(name, report, markdown, args.out_dir):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Voxtral engine speed: per-stage latency, batch throughput, against plain ``generate``.

No weights can be downloaded here, so the model has random weights and a forced decode
length (every utterance decodes exactly ``--tokens`` tokens, end-of-text ignored): the work
per token is that of the real model, only the words are nonsense. ::

    .venv/bin/python bench/engine.py            # Voxtral Mini 3B shape, bf16, on CUDA
    .venv/bin/python bench/engine.py --tiny     # tiny random Voxtral on the CPU, seconds

Reported, all in milliseconds unless said otherwise:

* latency at batch 1 (p50 / p95 over ``--repeat`` runs) for each utterance length and
  decode length, split into log-mel, encoder, prefill and per decoded token;
* throughput at batch 1..N (utterances per second, one batched call of N utterances);
* plain eager ``transformers`` in the same run: ``VoxtralProcessor.apply_transcription_request``
  then ``model.generate`` with the same forced length (dynamic cache, no compile).

The engine's start-up (load, and with CUDA the compile + CUDA-graph capture of every batch
bucket) is timed separately: it happens once, before a server accepts calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to fetch

import torch

from agent.config import EngineConfig
from agent.engines.base import EngineRequest
from agent.engines.voxtral import StageTimings, VoxtralEngine, VoxtralOptions
from agent.engines.voxtral_fixture import build_tiny_voxtral, full_size_voxtral
from bench.common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    save_results,
    summarize,
)

SR = 16_000


def utterance(seconds: float, seed: int) -> npt.NDArray[np.float32]:
    """Tones plus noise: content is irrelevant to random weights, length is what counts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.2 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def build(args: argparse.Namespace, workdir: Path) -> tuple[VoxtralEngine, Any, Any, float]:
    """The engine (warmed up), its model and processor, and the start-up seconds."""
    started = time.perf_counter()
    options = VoxtralOptions(compile=args.compile)
    max_batch = max(args.batch)
    if args.tiny:
        from transformers import VoxtralForConditionalGeneration, VoxtralProcessor

        path = build_tiny_voxtral(workdir / "tiny-voxtral")
        config = EngineConfig(
            kind="voxtral", model=str(path), device=args.device, max_batch=max_batch
        )
        engine = VoxtralEngine(config, options)
        model: Any = engine._model
        processor: Any = VoxtralProcessor.from_pretrained(str(path))
        assert isinstance(model, VoxtralForConditionalGeneration)
    else:
        device = "cuda" if args.device == "auto" else args.device
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, processor = full_size_voxtral(device, dtype)
        config = EngineConfig(kind="voxtral", device=device, max_batch=max_batch)
        engine = VoxtralEngine(config, options, model=model, processor=processor)
    engine.warmup()
    return engine, model, processor, time.perf_counter() - started


def engine_latency(
    engine: VoxtralEngine, seconds: float, tokens: int, repeat: int
) -> dict[str, Any]:
    runs: list[StageTimings] = []
    wall: list[float] = []
    for i in range(repeat):
        request = EngineRequest(utterance(seconds, i), language="en")
        t0 = time.perf_counter()
        _, timings = engine.transcribe_timed([request], force_new_tokens=tokens)
        wall.append((time.perf_counter() - t0) * 1000)
        runs.append(timings)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "logmel_ms": summarize(r.logmel_ms for r in runs).as_dict(),
        "encoder_ms": summarize(r.encoder_ms for r in runs).as_dict(),
        "prefill_ms": summarize(r.prefill_ms for r in runs).as_dict(),
        "per_token_ms": _fine(r.per_token_ms for r in runs),
        "total_ms": summarize(wall).as_dict(),
    }


def eager_latency(
    model: Any, processor: Any, seconds: float, tokens: int, repeat: int
) -> dict[str, Any]:
    """Plain transformers: the processor's own request path, then ``generate``."""
    device, dtype = model.device, model.dtype
    prep: list[float] = []
    total: list[float] = []
    for i in range(repeat):
        t0 = time.perf_counter()
        inputs = processor.apply_transcription_request(
            audio=[utterance(seconds, i)],
            model_id="bench",
            language="en",
            sampling_rate=SR,
            format="wav",
        )
        inputs = inputs.to(device, dtype=dtype)
        _sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        _sync(device)
        t2 = time.perf_counter()
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        prep.append((t1 - t0) * 1000)
        total.append((t2 - t0) * 1000)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "prep_ms": summarize(prep).as_dict(),
        "total_ms": summarize(total).as_dict(),
    }


def throughput(
    engine: VoxtralEngine, batch: int, seconds: float, tokens: int, repeat: int
) -> dict[str, Any]:
    requests = [EngineRequest(utterance(seconds, i), language="en") for i in range(batch)]
    wall: list[float] = []
    runs: list[StageTimings] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _, timings = engine.transcribe_timed(requests, force_new_tokens=tokens)
        wall.append((time.perf_counter() - t0) * 1000)
        runs.append(timings)
    p50 = float(np.percentile(wall, 50))
    return {
        "batch": batch,
        "bucket": runs[0].bucket,
        "total_ms": summarize(wall).as_dict(),
        "per_token_ms": _fine(r.per_token_ms for r in runs),
        "utterances_per_s": round(batch / (p50 / 1000), 2),
    }


def render(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"## Voxtral engine — {setup['model']} on {setup['device_name']}",
        "",
        f"{setup['parameters'] / 1e9:.3f} B parameters, {setup['dtype']}, decode compiled: "
        f"{setup['compiled']}, buckets {setup['buckets']}, start-up {setup['startup_s']:.1f} s "
        f"(load + warm-up). torch {setup['torch']}, transformers {setup['transformers']}. "
        "Random weights, forced decode length; ms, p50 / p95.",
        "",
        "### Latency at batch 1",
        "",
    ]
    eager = {(e["seconds"], e["tokens"]): e for e in report["eager"]}
    rows = []
    for r in report["latency"]:
        e = eager.get((r["seconds"], r["tokens"]))
        speedup = "—"
        if e is not None and r["total_ms"]["p50"]:
            speedup = f"{e['total_ms']['p50'] / r['total_ms']['p50']:.1f}×"
        rows.append(
            [
                f"{r['seconds']:g} s",
                r["tokens"],
                _cell(r["logmel_ms"], 1),
                _cell(r["encoder_ms"], 1),
                _cell(r["prefill_ms"], 1),
                _cell(r["per_token_ms"], 2),
                _cell(r["total_ms"], 1),
                _cell(e["total_ms"], 1) if e else "—",
                _cell(e["prep_ms"], 1) if e else "—",
                speedup,
            ]
        )
    headers = [
        "audio",
        "tokens",
        "log-mel",
        "encoder",
        "prefill",
        "per token",
        "engine total",
        "eager generate",
        "of which processor",
        "speed-up",
    ]
    lines += [markdown_table(headers, rows), "", "### Throughput", ""]
    tp = report["throughput_setup"]
    lines += [
        f"{tp['seconds']:g} s utterances, {tp['tokens']} tokens each, one call per batch.",
        "",
    ]
    rows = [
        [
            t["batch"],
            t["bucket"],
            _cell(t["total_ms"], 1),
            _cell(t["per_token_ms"], 2),
            t["utterances_per_s"],
        ]
        for t in report["throughput"]
    ]
    headers = ["batch", "bucket", "call", "per token", "utterances/s"]
    lines += [markdown_table(headers, rows)]
    return "\n".join(lines)


def _fine(values: Any) -> dict[str, Any]:
    """Like ``summarize`` with two decimals: per-token times are a few milliseconds."""
    data = np.asarray(list(values), dtype=np.float64)
    return {
        "n": int(data.size),
        "p50": round(float(np.percentile(data, 50)), 3),
        "p95": round(float(np.percentile(data, 95)), 3),
    }


def _cell(summary: dict[str, Any], digits: int) -> str:
    return f"{summary['p50']:.{digits}f} / {summary['p95']:.{digits}f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random Voxtral (CPU, seconds)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="default: cpu with --tiny, else cuda",
    )
    p.add_argument("--seconds", type=float, nargs="+", default=[1, 3, 10, 30])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 48])
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="throughput batch sizes (default 1..64, 1..8 with --tiny)",
    )
    p.add_argument("--throughput-seconds", type=float, default=10.0)
    p.add_argument("--throughput-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=None, help="runs per figure (default 10, 5 tiny)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step (default: on CUDA only)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 with --tiny: steadier when shared)",
    )
    p.add_argument("--no-eager", action="store_true", help="skip the plain generate baseline")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-save", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.batch = args.batch or ([1, 2, 4, 8] if args.tiny else [1, 2, 4, 8, 16, 32, 64])
    args.repeat = args.repeat or (5 if args.tiny else 10)
    args.threads = args.threads or (1 if args.tiny else None)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU: use --tiny (CPU) or --device cpu (full size on a CPU: very slow)")
    if max(args.seconds) > 30 or min(args.seconds) <= 0:
        p.error("--seconds must be in (0, 30]: Voxtral's window is 30 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the tables are the output
    if args.threads:
        # OpenMP threads that spin-wait for each other degrade badly when another process
        # takes one of their cores; one thread gives comparable figures on a shared machine.
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as workdir:
        engine, model, processor, startup_s = build(args, Path(workdir))
        device = model.device
        report: dict[str, Any] = {
            "setup": {
                "model": "tiny random Voxtral" if args.tiny else "Voxtral Mini 3B shape, random",
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else "CPU",
                "dtype": str(model.dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters()),
                "compiled": engine.compiled,
                "buckets": list(engine.buckets),
                "startup_s": round(startup_s, 2),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "torch_threads": torch.get_num_threads(),
                "repeat": args.repeat,
            },
            "machine": machine_info(),
            "latency": [
                engine_latency(engine, s, n, args.repeat) for s in args.seconds for n in args.tokens
            ],
            "throughput_setup": {
                "seconds": args.throughput_seconds,
                "tokens": args.throughput_tokens,
            },
            "throughput": [
                throughput(engine, b, args.throughput_seconds, args.throughput_tokens, args.repeat)
                for b in args.batch
            ],
            "eager": [],
        }
        if not args.no_eager:
            eager_latency(model, processor, 1.0, 4, 1)  # first-call allocations off the clock
            report["eager"] = [
                eager_latency(model, processor, s, n, args.repeat)
                for s in args.seconds
                for n in args.tokens
            ]
        engine.close()
    markdown = render(report)
    print(markdown)
    if not args.no_save:
        name = "engine-tiny" if args.tiny else "engine"
        for path in save_results(name, report, markdown, args.out_dir):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-shot GPU run of bench/engine.py's measurements, sized for a short device lease.

Same functions as ``bench/engine.py`` (engine_latency, throughput, eager_latency, render),
but: buckets limited to the batch sizes measured (each bucket costs a compile), compile time
and GPU memory per bucket recorded, dynamo counters checked across serving, a deadline that
skips what would not finish, and the JSON rewritten after every phase so a timeout still
leaves figures. ``--tiny`` runs the same path on the CPU with the tiny model (dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--deadline-s", type=float, default=240.0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, nargs="+", default=[1, 4, 10, 30])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 48])
    p.add_argument("--tp-seconds", type=float, default=4.0)
    p.add_argument("--tp-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--eager-repeat", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return args.deadline_s - (time.perf_counter() - T0)

    from torch._dynamo.utils import counters
    from transformers.utils import logging as hf_logging

    from agent.config import EngineConfig
    from agent.engines.base import EngineRequest
    from agent.engines.voxtral import VoxtralEngine, VoxtralOptions
    from agent.engines.voxtral_fixture import build_tiny_voxtral, full_size_voxtral
    from bench.engine import (
        eager_latency,
        engine_latency,
        render,
        throughput,
        utterance,
    )

    hf_logging.disable_progress_bar()
    cuda = not args.tiny
    device = "cuda" if cuda else "cpu"
    report: dict[str, Any] = {"errors": [], "phases_skipped": []}
    json_path = args.out / "engine_gpu.json"

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")

    def mem() -> dict[str, float]:
        if not cuda:
            return {}
        gib = 1024**3
        return {
            "allocated_gib": round(torch.cuda.memory_allocated() / gib, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / gib, 2),
            "max_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
        }

    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    t = time.perf_counter()
    if args.tiny:
        from transformers import VoxtralForConditionalGeneration, VoxtralProcessor

        path = build_tiny_voxtral(Path(tmp) / "tiny")
        model: Any = VoxtralForConditionalGeneration.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa"
        )
        processor: Any = VoxtralProcessor.from_pretrained(str(path))
    else:
        model, processor = full_size_voxtral("cuda", torch.bfloat16)
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    log(f"model built in {build_s:.1f} s; {mem()}")

    buckets = tuple(sorted(set(args.batch)))
    compile_flag = False if (args.tiny or args.no_compile) else None
    config = EngineConfig(kind="voxtral", device=device, max_batch=max(buckets))

    def make_engine(compile_: bool | None) -> VoxtralEngine:
        options = VoxtralOptions(compile=compile_, batch_buckets=buckets)
        return VoxtralEngine(config, options, model=model, processor=processor)

    engine = make_engine(compile_flag)
    report["setup"] = {
        "model": "tiny random Voxtral" if args.tiny else "Voxtral Mini 3B shape, random",
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda else "CPU",
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "compiled": engine.compiled,
        "buckets": list(engine.buckets),
        "build_s": round(build_s, 2),
        "startup_s": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": __import__("transformers").__version__,
        "repeat": args.repeat,
        "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cache_len": engine._cache_len,
    }
    report["memory_after_build"] = mem()
    save()

    # Bucket by bucket: warm up (compile + capture, what engine.warmup() does), then measure
    # it at once, so a deadline cuts the largest buckets, not every figure.
    rng = np.random.default_rng(0)
    noise = [(rng.standard_normal(16_000) * 0.01).astype(np.float32) for _ in range(2)]
    keys = ("stats", "recompiles", "graph_break")
    report["warmup"] = []
    report["latency"] = []
    report["throughput_setup"] = {"seconds": args.tp_seconds, "tokens": args.tp_tokens}
    report["throughput"] = []
    report["dynamo_unchanged_while_serving"] = {}
    warm_s = 0.0
    warm_buckets: list[int] = []
    last_compile = 0.0
    for bucket in engine.buckets:
        if warm_buckets and left() < 1.3 * last_compile + 30:
            report["phases_skipped"].append(f"bucket {bucket} (deadline)")
            log(f"skip bucket {bucket}: {left():.0f} s left, last compile {last_compile:.0f} s")
            continue
        t = time.perf_counter()
        try:
            engine.transcribe_timed(
                [EngineRequest(noise[i % 2]) for i in range(bucket)], force_new_tokens=4
            )
        except Exception as exc:
            report["errors"].append(f"warm-up bucket {bucket}: {traceback.format_exc()}")
            log(f"WARM-UP FAILED at bucket {bucket}: {exc!r}")
            traceback.print_exc()
            save()
            if not engine.compiled:
                raise
            log("falling back to an eager decode to get figures anyway")
            engine.close()
            engine = make_engine(False)
            report["setup"]["compiled"] = False
            report["setup"]["compile_failed"] = True
            t = time.perf_counter()
            engine.transcribe_timed(
                [EngineRequest(noise[i % 2]) for i in range(bucket)], force_new_tokens=4
            )
        last_compile = time.perf_counter() - t
        warm_s += last_compile
        warm_buckets.append(bucket)
        report["warmup"].append({"bucket": bucket, "seconds": round(last_compile, 2), **mem()})
        log(f"bucket {bucket} warmed (compile + capture) in {last_compile:.1f} s; {mem()}")
        report["setup"]["startup_s"] = round(build_s + warm_s, 2)
        report["setup"]["warm_buckets"] = warm_buckets
        save()
        before = {k: dict(counters[k]) for k in keys}
        if bucket == engine.buckets[0]:
            for s in args.seconds:
                for n in args.tokens:
                    report["latency"].append(engine_latency(engine, s, n, args.repeat))
                    r = report["latency"][-1]
                    log(
                        f"latency {s:g} s {n} tok: total {r['total_ms']}, "
                        f"per token {r['per_token_ms']}"
                    )
        if bucket in args.batch:
            r = throughput(engine, bucket, args.tp_seconds, args.tp_tokens, args.repeat)
            p50 = r["total_ms"]["p50"] / 1000
            p95 = r["total_ms"]["p95"] / 1000
            r["rtf_p50"] = round(p50 / args.tp_seconds, 4)  # one utterance's wait / its length
            r["rtf_p95"] = round(p95 / args.tp_seconds, 4)
            r["audio_s_per_s"] = round(bucket * args.tp_seconds / p50, 1)
            r["memory"] = mem()
            report["throughput"].append(r)
            log(f"throughput batch {bucket}: {r['total_ms']}, {r['utterances_per_s']} utt/s")
        after = {k: dict(counters[k]) for k in keys}
        same = before == after
        report["dynamo_unchanged_while_serving"][str(bucket)] = same
        if not same:
            report["errors"].append(
                f"dynamo counters moved serving bucket {bucket}: {before} -> {after}"
            )
        log(f"dynamo counters unchanged while serving bucket {bucket}: {same}")
        save()

    # Varied traffic once every bucket is compiled: must not compile anything.
    before = {k: dict(counters[k]) for k in keys}
    mixed = [(0.3, "en"), (2.0, None), (7.5, "fr"), (29.0, "de")]
    for size in sorted({1, 3, *warm_buckets}):
        if size > warm_buckets[-1] or left() < 15:
            continue
        batch = [
            EngineRequest(utterance(mixed[i % 4][0], i), language=mixed[i % 4][1])
            for i in range(size)
        ]
        engine.transcribe(batch)
    after = {k: dict(counters[k]) for k in keys}
    report["dynamo_unchanged_mixed_traffic"] = before == after
    report["dynamo_counters_end"] = after
    log(f"dynamo counters unchanged over mixed traffic: {before == after}")
    report["memory_after_serving"] = mem()
    save()

    report["eager"] = []
    if left() > 30:
        try:
            eager_latency(model, processor, 1.0, 4, 1)
            for n in args.tokens:
                if left() < 15:
                    report["phases_skipped"].append(f"eager {n} tokens (deadline)")
                    continue
                report["eager"].append(
                    eager_latency(model, processor, args.tp_seconds, n, args.eager_repeat)
                )
                log(f"eager generate {args.tp_seconds:g} s {n} tok: {report['eager'][-1]}")
                save()
        except Exception:
            report["errors"].append(f"eager: {traceback.format_exc()}")
            traceback.print_exc()
    else:
        report["phases_skipped"].append("eager baseline (deadline)")
    engine.close()
    save()

    markdown = render(report) if report["latency"] else "(no latency figures)"
    rows = [
        f"| {r['batch']} | {r['bucket']} | {r['total_ms']['p50']:.1f} / {r['total_ms']['p95']:.1f}"
        f" | {r['per_token_ms']['p50']:.2f} | {r['utterances_per_s']} | {r['audio_s_per_s']}"
        f" | {r['rtf_p50']:.3f} / {r['rtf_p95']:.3f} |"
        for r in report["throughput"]
    ]
    markdown += (
        "\n\n### Throughput with real-time factor\n\n"
        "| batch | bucket | call ms p50 / p95 | per token ms | utterances/s | audio s per s "
        "| RTF per utterance p50 / p95 |\n|:---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n\n### Start-up\n\n"
        + f"model build {build_s:.1f} s; warm-up per bucket: "
        + ", ".join(f"{w['bucket']}: {w['seconds']} s" for w in report["warmup"])
        + f"\n\nerrors: {len(report['errors'])}; skipped: {report['phases_skipped']}\n"
    )
    (args.out / "engine_gpu.md").write_text(markdown)
    print(markdown)
    log("done")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

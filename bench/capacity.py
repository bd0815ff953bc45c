"""Capacity: the most simultaneous calls one server process holds with every frame on time
and finals fast enough. ::

    .venv/bin/python bench/capacity.py                       # ramp 1 2 4 8 12 16 20 24 32
    .venv/bin/python bench/capacity.py --calls 1 4 8 --no-save
    .venv/bin/python bench/capacity.py --transport ws --calls 1 2 4 6 8   # /v1/realtime

The server runs as a subprocess (``python -m signaling.cli serve``, its CPU measured alone)
with the default configuration (embedded Whisper tiny.en, Silero VAD) forced onto 127.0.0.1.
For each call count N, in turn, N aiortc clients in this process play the speech file at
once (starts staggered over ``--stagger-ms``), exactly as ``bench/latency.py`` does (its phase
runner is reused), and the server's ``/metrics`` are read before and after. A count passes
when all three hold:

1. **every frame on time**: no chunk of any call's audio was more than ``--late-ms`` behind
   real time when the VAD had processed it (``voxtral_rtc_audio_lag_seconds``: processing
   time minus the earliest time the audio could have been complete, so network delay
   cancels out and a stalled loop, an overloaded VAD pool or a jitter-buffer burst shows);
2. **fast finals**: p95 of end of speech -> ``completed`` at the client <= ``--p95-ms``;
3. **nothing lost**: every utterance of every call has its ``completed`` (none failed).

``--transport ws`` ramps ``/v1/realtime`` WebSocket sessions instead (``bench/latency.py``'s
WS client: pcm16 24 kHz appends of 50 ms paced in real time); the three checks are the same
(the server meters a socket's audio lag as it does a call's).

The ramp stops after the first count that fails (``--keep-going`` runs them all). The
capacity is the largest passing count. The clients share the machine with the server: on a
small machine their CPU (Opus encoding, SRTP, aiortc) is reported as *bench CPU %*.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.transports.webrtc_peer import restrict_host_addresses
from bench.common import (
    LOOPBACK,
    REPO_ROOT,
    add_run_args,
    audio_header,
    check_run_args,
    free_port,
    loopback_config,
    machine_info,
    markdown_table,
    report_header,
    run_bench,
    subprocess_server,
    summarize,
)
from bench.latency import (
    _transport_arg,
    offline_utterances,
    parse_transports,
    pooled_wer,
    run_phase,
    transport_order,
)
from voxtral_rtc_client import read_audio

LAG = "voxtral_rtc_audio_lag_seconds"


async def scrape(url: str) -> dict[str, float]:
    """The audio-lag histogram's cumulative buckets (by ``le``) and count, from ``/metrics``."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != LAG:
            continue
        for sample in family.samples:
            if sample.name == f"{LAG}_bucket":
                out[sample.labels["le"]] = sample.value
            elif sample.name == f"{LAG}_count":
                out["count"] = sample.value
    return out


def lag_summary(
    before: dict[str, float], after: dict[str, float], late_ms: float
) -> dict[str, Any]:
    """Chunks processed in the phase, how many were late, and the bucket of the latest."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    total = delta.get("count", 0.0)
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("count", "+Inf"))
    on_time = max((v for b, v in bounds if b <= late_ms / 1000), default=0.0)
    worst = next((b for b, v in bounds if v >= total), float("inf"))
    within_100 = max((v for b, v in bounds if b <= 0.1), default=0.0)
    return {
        "chunks": int(total),
        "late": int(total - on_time),
        "over_100ms": int(total - within_100),
        "max_bucket_ms": None if worst == float("inf") else round(worst * 1000),
    }


def _checks(
    records: list[dict[str, Any]], counts: dict[str, int], late: int, p95_ms: float
) -> dict[str, bool]:
    p95 = summarize(r["end_to_final_ms"] for r in records).p95
    return {
        "frames_on_time": late == 0,
        "p95_ok": p95 is not None and p95 <= p95_ms,
        "none_lost": counts["completed"] == counts["expected"]
        and not counts["failed"]
        and not counts["call_errors"],
    }


def _step(n: int, runs: list[dict[str, Any]], p95_ms: float) -> dict[str, Any]:
    """One count's verdict over its runs (of one transport): finals pooled (p95 of them
    all), counts summed."""
    records = [r for p in runs for c in p["call_results"] for r in c["records"]]
    counts = {k: sum(p["counts"][k] for p in runs) for k in runs[0]["counts"]}
    late = sum(p["audio_lag"]["late"] for p in runs)
    checks = _checks(records, counts, late, p95_ms)
    cpu = [p["server_load_pct"] for p in runs if p.get("server_load_pct") is not None]
    return {
        "transport": runs[0].get("transport", "webrtc"),
        "calls": n,
        "server_load_pct": cpu,
        "runs": len(runs),
        "end_to_final_ms": summarize(r["end_to_final_ms"] for r in records).as_dict(),
        "counts": counts,
        "late_chunks": late,
        "chunks": sum(p["audio_lag"]["chunks"] for p in runs),
        "checks": checks,
        "passed": all(checks.values()),
        "wer": pooled_wer([c for p in runs for c in p["call_results"]]),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    restrict_host_addresses([LOOPBACK])
    samples = read_audio(args.audio)
    load_before = os.getloadavg()[0]
    machine = machine_info()  # the commit the server starts from, not the one at the end
    phases: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        base = Path(tmp) / "base.yaml"
        raw: dict[str, Any] = (
            yaml.safe_load(args.config.read_text()) if args.config else None
        ) or {}
        raw.setdefault("limits", {})["offers_per_minute_per_ip"] = 0  # one address, many calls
        base.write_text(yaml.safe_dump(raw))
        port = free_port()
        config = loopback_config(base, port, Path(tmp) / "server.yaml", max(args.calls))
        offline = offline_utterances(samples, config)
        phase_args = argparse.Namespace(
            seed=args.seed,
            stagger_ms=args.stagger_ms,
            tail_timeout_s=args.tail_timeout_s,
            match_tolerance_ms=400.0,
            ws_chunk_ms=args.ws_chunk_ms,
            quiet_pct=args.quiet_pct,
            quiet_wait_s=args.quiet_wait_s,
            reference_text=args.reference_text,
        )
        # Several transports: each count runs them in turn (the order reversed every other
        # repetition); a transport leaves the ramp after its first failing count.
        ramping = list(parse_transports(args.transport))
        async with subprocess_server(Path(tmp) / "server.yaml", port) as server:
            engine = server.engine
            for n in args.calls:
                if not ramping:
                    break
                runs: dict[str, list[dict[str, Any]]] = {t: [] for t in ramping}
                for repeat in range(1, args.repeat + 1):
                    for transport in transport_order(",".join(ramping), repeat):
                        runs[transport].append(
                            await _capacity_phase(
                                server,
                                config,
                                samples,
                                offline,
                                n,
                                repeat,
                                phase_args,
                                args,
                                transport,
                            )
                        )
                        await asyncio.sleep(args.settle_s)
                for transport, mine in runs.items():
                    phases.extend(mine)
                    step = _step(n, mine, args.p95_ms)
                    steps.append(step)
                    print(
                        f"  -> {transport} {n} streams: "
                        f"{'PASS' if step['passed'] else 'FAIL'} {step['checks']}; p95 "
                        f"{step['end_to_final_ms']['p95']} ms over {len(mine)} run(s); late "
                        f"chunks {step['late_chunks']}/{step['chunks']}",
                        file=sys.stderr,
                    )
                    if not step["passed"] and not args.keep_going:
                        ramping.remove(transport)
    by_transport = {}
    for transport in parse_transports(args.transport):
        mine = [st for st in steps if st["transport"] == transport]
        capacity = 0
        for st in mine:  # the largest count with every count up to it passing
            if not st["passed"]:
                break
            capacity = st["calls"]
        by_transport[transport] = {
            "capacity": capacity,
            "per_core": round(capacity / (os.cpu_count() or 1), 2),
            "passing": [st["calls"] for st in mine if st["passed"]],
        }
    single = len(by_transport) == 1
    return {
        **report_header("capacity", args, machine, load_before),
        "engine": engine,
        "transport": args.transport,
        "config": asdict(config),
        **audio_header(args, samples),
        "criteria": {"late_ms": args.late_ms, "p95_ms": args.p95_ms},
        # One transport: its capacity and passing counts, as before; several: per transport.
        "capacity": next(iter(by_transport.values()))["capacity"] if single else None,
        "passing": next(iter(by_transport.values()))["passing"] if single else None,
        "by_transport": by_transport,
        "steps": steps,
        "phases": phases,
    }


async def _capacity_phase(
    server: Any,
    config: Any,
    samples: Any,
    offline: Any,
    n: int,
    repeat: int,
    phase_args: argparse.Namespace,
    args: argparse.Namespace,
    transport: str,
) -> dict[str, Any]:
    """``latency.py``'s phase, with the server's audio lag read around it and the checks."""
    before = await scrape(server.url)
    phase = await run_phase(server, config, samples, offline, n, repeat, phase_args, transport)
    lag = lag_summary(before, await scrape(server.url), args.late_ms)
    checks = _checks(
        [r for c in phase["call_results"] for r in c["records"]],
        phase["counts"],
        lag["late"],
        args.p95_ms,
    )
    phase.update(audio_lag=lag, checks=checks, passed=all(checks.values()))
    return phase


def render(report: dict[str, Any]) -> str:
    crit, machine = report["criteria"], report["machine"]
    rows = []
    for p in report["phases"]:
        s, c, lag = p["summary"]["end_to_final_ms"], p["counts"], p["audio_lag"]
        rows.append(
            [
                p.get("transport", "webrtc"),
                p["calls"],
                p["repeat"],
                "pass" if p["passed"] else "FAIL",
                f"{c['completed']}/{c['expected']}",
                c["failed"] + c["call_errors"],
                "—" if s["p50"] is None else f"{s['p50']:.0f} / {s['p95']:.0f}",
                f"{lag['late']}/{lag['chunks']}",
                lag["over_100ms"],
                "—" if lag["max_bucket_ms"] is None else f"≤ {lag['max_bucket_ms']}",
                p["server_load_pct"],
                p["bench_cpu_pct"],
                p.get("other_cpu_pct", "—"),
                p["engine_busy_pct"],
                p["wall_s"],
            ]
        )
    headers = (
        "transport",
        "streams",
        "run",
        "result",
        "finals",
        "failed",
        "end of speech → final p50 / p95 ms",
        f"chunks > {crit['late_ms']:.0f} ms late",
        "> 100 ms",
        "worst lag ms",
        "server CPU %",
        "bench CPU %",
        "other CPU %",
        "engine busy %",
        "wall s",
    )
    cfg = report["config"]
    step_rows = [
        [
            st.get("transport", "webrtc"),
            st["calls"],
            st["runs"],
            "pass" if st["passed"] else "FAIL",
            f"{st['counts']['completed']}/{st['counts']['expected']}",
            "—"
            if st["end_to_final_ms"]["p50"] is None
            else f"{st['end_to_final_ms']['p50']:.0f} / {st['end_to_final_ms']['p95']:.0f}",
            f"{st['late_chunks']}/{st['chunks']}",
            ", ".join(f"{v:.0f}" for v in st.get("server_load_pct", [])) or "—",
            "—" if (st.get("wer") or {}).get("pct") is None else f"{st['wer']['pct']:.1f}",
            ", ".join(k for k, ok in st["checks"].items() if not ok) or "—",
        ]
        for st in report.get("steps", [])
    ]
    step_headers = (
        "transport",
        "streams",
        "runs",
        "result",
        "finals",
        "end of speech → final p50 / p95 ms (all runs)",
        f"chunks > {crit['late_ms']:.0f} ms late",
        "server CPU % (runs)",
        "WER %",
        "failed checks",
    )
    cores = machine["cpu_count"] or 1
    headline = [
        f"**Capacity, {_TRANSPORT_NAMES[t]}: {v['capacity']} simultaneous, "
        f"{v['capacity'] / cores:g} per core ({cores} cores).**"
        for t, v in report.get("by_transport", {}).items()
    ] or [f"**Capacity: {report['capacity']} simultaneous streams.**"]
    transports = parse_transports(report.get("transport", "webrtc"))
    pooled = (
        [
            "Per count, the runs pooled (the verdict):",
            "",
            markdown_table(step_headers, step_rows),
            "",
            "Per run:",
            "",
        ]
        if any(st["runs"] > 1 for st in report.get("steps", []))
        else []
    )
    return "\n".join(
        [
            "# Capacity (bench/capacity.py)",
            "",
            f"- date: {report['date']}",
            f"- command: `{report['command']}`",
            f"- machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}); 1-min load "
            f"average {machine['load_avg_1m'][0]:.2f} before, {machine['load_avg_1m'][1]:.2f} "
            "after",
            f"- server: subprocess; engine {report['engine']} (lanes {cfg['engine']['lanes']}, "
            f"beam {cfg['engine']['beam_size']}, interims every "
            f"{cfg['engine']['interim_interval_ms']} ms); VAD {cfg['vad']['kind']}",
            f"- transport: {'; '.join(_TRANSPORT_WORDS[t] for t in transports)}"
            + ("; they alternate within each count" if len(transports) > 1 else ""),
            f"- audio: {report['audio']['path']} ({report['audio']['seconds']} s) per stream",
            f"- pass = no audio chunk more than {crit['late_ms']:.0f} ms behind real time at "
            f"the VAD, p95 end of speech → final ≤ {crit['p95_ms']:.0f} ms, no final lost",
            "",
            *(line for h in headline for line in (h, "")),
            *pooled,
            markdown_table(headers, rows),
            "",
            "*worst lag* is the upper bound of the audio-lag histogram bucket holding the "
            "latest chunk; *server CPU %* is the server process's CPU seconds / wall seconds "
            "(200 % = both cores); *bench CPU %* the same for the clients; *other CPU %* "
            "everything else the machine ran meanwhile (noise).",
        ]
    )


_TRANSPORT_NAMES = {
    "webrtc": "WebRTC calls",
    "ws": "/v1/realtime sessions",
    "twilio": "Twilio phone streams",
}
_TRANSPORT_WORDS = {
    "webrtc": "WebRTC (aiortc calls, Opus)",
    "ws": "WebSocket /v1/realtime?intent=transcription (pcm16 24 kHz appends, base64)",
    "twilio": "Twilio Media Streams /v1/twilio/media-stream (8 kHz mu-law, 20 ms media; "
    "events at a /v1/calls/{callSid}/events subscriber)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Most simultaneous calls one server holds with frames on time and fast "
        "finals (all on 127.0.0.1).",
        epilog="example: .venv/bin/python bench/capacity.py --calls 1 2 4 8 12 16",
    )
    p.add_argument("--audio", type=Path, default=REPO_ROOT / "tests/data/beckett.wav")
    p.add_argument(
        "--calls",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 12, 16, 20, 24, 32],
        help="call counts, ramped in this order (default: 1 2 4 8 12 16 20 24 32)",
    )
    p.add_argument(
        "--transport",
        type=_transport_arg,
        default="webrtc",
        help="webrtc (default): aiortc calls; ws: /v1/realtime sessions; twilio: phone "
        "streams (as bench/latency.py); a comma-separated list (webrtc,twilio): each count "
        "runs them in turn, each ramped until its own first failing count",
    )
    p.add_argument("--ws-chunk-ms", type=int, default=50, help="audio per WS append in ms (50)")
    p.add_argument("--config", type=Path, help="base YAML for the server (default: defaults)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per count; its verdict pools their finals (p95 of all) (default: 1)",
    )
    p.add_argument("--late-ms", type=float, default=200.0, help="a chunk later is late (200)")
    p.add_argument("--p95-ms", type=float, default=2000.0, help="p95 end->final bound (2000)")
    p.add_argument("--stagger-ms", type=float, default=200.0, help="call start spread (200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tail-timeout-s", type=float, default=30.0, help="wait for finals after the audio (30)"
    )
    p.add_argument("--settle-s", type=float, default=2.0, help="pause between counts (2)")
    p.add_argument("--keep-going", action="store_true", help="run every count, even after a fail")
    add_run_args(p)
    args = p.parse_args(argv)
    return check_run_args(p, args)


def main(argv: list[str] | None = None) -> int:
    # The verdict is in the table (the most calls held), not in the exit status.
    return run_bench("capacity", parse_args(argv), bench, render, lost=lambda report: 0)


if __name__ == "__main__":
    sys.exit(main())

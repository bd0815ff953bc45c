"""A gateway with a remote engine node against the same engine in process, in one run. ::

    .venv/bin/python bench/gateway.py --calls 1 4 8 --repeat 3 --quiet-pct 25
    .venv/bin/python bench/gateway.py --layout remote --calls 1 4 --no-save

Two layouts of the same product on 127.0.0.1, each a ``voxtral-rtc serve`` subprocess
started by this script (``bench/common.py`` ``subprocess_server``) and ended by its PID:

* ``inprocess``: one server with the embedded engine (the default configuration, or
  ``--config``): calls, VAD, segmenter and engine in one process;
* ``remote``: a **gateway** (the same configuration with ``engine.kind: remote``,
  ``engine.remote.base_url: http://127.0.0.1:NODEPORT/v1``) that terminates the calls and
  posts every utterance (finals, and interims while they are on) to an **engine node**: another
  server with the same embedded engine, answering ``POST /v1/audio/transcriptions``
  (``limits.max_file_jobs`` raised to ``--node-file-jobs`` so it never answers 503 to the
  gateway's ``max_concurrency``).

All three processes stay up for the whole run; for each call count and repetition the
layouts run one after the other (the order reversed every other repetition), through
``bench/latency.py``'s phase runner: N WebRTC calls (or ``--transport ws|twilio``) playing
the file, end of speech -> ``completed`` at the client, matched to an offline VAD pass.
Around every phase the CPU time (``/proc/PID/stat``, the process **and its reaped children**:
the node decodes every upload in a child process) of each of the three processes is read,
so the gateway's and the node's CPU are separate figures, and ``/metrics`` of each is
scraped: the gateway's per-request round trip (``voxtral_rtc_engine_batch_seconds``), the
node's engine time per batch (the same histogram, ``priority="file"``), HTTP error codes.

Calls per gateway core = 100 / (gateway CPU % of one core per call).

``--calibrate N`` (default 3, remote layout only) then posts each offline utterance (the
segmenter's own cut: pre-roll + speech + hangover, as the gateway sends it) to the node N
times, one request at a time, on an otherwise idle node: the client's round trip against the
node's engine time for that one request (its ``/metrics`` read around it). The difference is
what the node's file pipeline costs per utterance (HTTP + multipart, reading the WAV (in the
node's process for the gateway's PCM WAVs, else a decoder child), the VAD pass and cutting
of ``agent/file_transcriber.py``), which an in-process engine does not pay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.audio_formats import pcm16_wav
from agent.config import Config
from agent.segmenter import Utterance
from agent.transports.webrtc_peer import restrict_host_addresses
from bench.common import (
    LOOPBACK,
    REPO_ROOT,
    ServerHandle,
    add_run_args,
    audio_header,
    check_run_args,
    free_port,
    loopback_config,
    machine_info,
    markdown_table,
    offline_cuts,
    process_cpu_seconds,
    report_header,
    run_bench,
    subprocess_server,
    summarize,
    wait_quiet,
)
from bench.latency import (
    _summaries,
    _transport_arg,
    offline_utterances,
    pooled_wer,
    run_phase,
)
from voxtral_rtc_client import read_audio

LAYOUTS = ("inprocess", "remote")
#: Which process a layout's calls go to.
FRONT = {"inprocess": "single", "remote": "gateway"}
BATCH = "voxtral_rtc_engine_batch_seconds"


@dataclass(frozen=True)
class Watched(ServerHandle):
    """A server whose ``cpu_seconds`` (read by ``run_phase`` right before and right after the
    calls) also snapshots every process of the run, children included."""

    watch: tuple[tuple[str, int], ...] = ()
    snaps: list[dict[str, float]] = field(default_factory=list, compare=False)

    def cpu_seconds(self) -> float | None:
        snap: dict[str, float] = {}
        for role, pid in self.watch:  # several nodes: one role, their sum
            total = process_cpu_seconds(pid, children=True)
            snap[role] = snap.get(role, 0.0) + total
            # The node's decoder children alone (reaped ones), to show their share.
            key = f"{role} children"
            snap[key] = snap.get(key, 0.0) + total - process_cpu_seconds(pid)
        self.snaps.append(snap)
        assert self.pid is not None
        return process_cpu_seconds(self.pid, children=True)


# -- /metrics ------------------------------------------------------------------------------


async def scrape_all(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of ``/metrics``, keyed ``name{label=value,...}``."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if s.name.endswith("_bucket"):
                continue
            out[f"{s.name}{{{labels}}}"] = float(s.value)
    return out


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 4) for k, v in after.items() if v != before.get(k)}


def _batch(delta: dict[str, float], priority: str) -> tuple[int, float]:
    """Engine calls of one priority in a phase and their summed wall seconds."""
    return (
        int(delta.get(f"{BATCH}_count{{priority={priority}}}", 0)),
        delta.get(f"{BATCH}_sum{{priority={priority}}}", 0.0),
    )


def _codes(delta: dict[str, float], source: str) -> dict[str, int]:
    prefix = "voxtral_rtc_errors_total{code="
    out = {}
    for key, v in delta.items():
        if key.startswith(prefix) and key.endswith(f"source={source}}}"):
            out[key[len(prefix) : key.index(",")]] = int(v)
    return out


def engine_figures(layout: str, deltas: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The engine side of a phase from the metrics: requests (remote) or batches (in
    process) per priority, their mean wall time, and for the remote layout the node's
    engine batches and what the round trips held beyond them."""
    front = deltas[FRONT[layout]]
    out: dict[str, Any] = {
        "skipped_interims": int(front.get("voxtral_rtc_skipped_interims_total{}", 0)),
        "failed_codes": _codes(front, "transcription"),
    }
    total_n, total_s = 0, 0.0
    for priority in ("final", "interim"):
        n, s = _batch(front, priority)
        out[f"{priority}_calls"] = n
        out[f"{priority}_mean_ms"] = round(1000 * s / n, 1) if n else None
        total_n, total_s = total_n + n, total_s + s
    if layout == "remote":
        node: dict[str, float] = {}
        for role, delta in deltas.items():  # every node's metrics summed
            if role.startswith("node"):
                for k, v in delta.items():
                    node[k] = node.get(k, 0.0) + v
        by_priority = {p: _batch(node, p) for p in ("final", "interim", "file")}
        n = sum(pn for pn, _ in by_priority.values())
        s = sum(ps for _, ps in by_priority.values())
        out["node_batches_by_priority"] = {p: pn for p, (pn, _) in by_priority.items()}
        out["node_skipped_interims"] = int(node.get("voxtral_rtc_skipped_interims_total{}", 0))
        out["node_batches"] = n
        out["node_batch_mean_ms"] = round(1000 * s / n, 1) if n else None
        out["node_engine_s"] = round(s, 3)
        out["gateway_round_trip_s"] = round(total_s, 3)
        # What the requests' round trips held beyond the node's engine calls, per request:
        # HTTP, the node's decoding, VAD and cutting, its queue. Overstated when the node
        # batched several requests in one call (counted once), understated by the engine
        # time of requests the gateway withdrew (aborted: not in its round trips).
        out["beyond_node_engine_ms_per_request"] = (
            round(1000 * (total_s - s) / total_n, 1) if total_n else None
        )
        out["node_http_codes"] = _codes(node, "http")
    return out


# -- calibration: the node's file pipeline, one request at a time ------------------------


async def calibrate(node_url: str, cuts: list[Utterance], repeat: int) -> dict[str, Any]:
    """Each cut posted to the idle node ``repeat`` times, one request at a time: the client's
    round trip against the node's engine time for that request (``/metrics`` around it)."""
    rows = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for r in range(repeat):
            for cut in cuts:
                wav = pcm16_wav(cut.audio)
                before = await scrape_all(http, node_url)
                form = aiohttp.FormData()
                form.add_field("response_format", "json")
                form.add_field("file", wav, filename="utterance.wav", content_type="audio/wav")
                t0 = time.perf_counter()
                async with http.post(f"{node_url}/v1/audio/transcriptions", data=form) as resp:
                    body = await resp.json()
                    status = resp.status
                rt = (time.perf_counter() - t0) * 1000
                n, s = _batch(metric_delta(before, await scrape_all(http, node_url)), "file")
                rows.append(
                    {
                        "repeat": r + 1,
                        "utterance": cut.index,
                        "audio_ms": round(1000 * len(cut.audio) / 16_000),
                        "status": status,
                        "text": body.get("text") if isinstance(body, dict) else None,
                        "round_trip_ms": round(rt, 1),
                        "node_engine_calls": n,
                        "node_engine_ms": round(1000 * s, 1),
                        "pipeline_ms": round(rt - 1000 * s, 1),
                    }
                )
    return {
        "requests": len(rows),
        "round_trip_ms": summarize(x["round_trip_ms"] for x in rows).as_dict(),
        "node_engine_ms": summarize(x["node_engine_ms"] for x in rows).as_dict(),
        "pipeline_ms": summarize(x["pipeline_ms"] for x in rows).as_dict(),
        "pipeline_share_pct": round(
            100 * sum(x["pipeline_ms"] for x in rows) / sum(x["round_trip_ms"] for x in rows), 1
        ),
        "rows": rows,
    }


# -- the run -------------------------------------------------------------------------------


def layout_order(layouts: Sequence[str], repeat: int) -> tuple[str, ...]:
    return tuple(layouts) if repeat % 2 else tuple(layouts)[::-1]


async def _phase(
    layout: str,
    handles: dict[str, Watched],
    config: Config,
    samples: Any,
    offline: Any,
    n: int,
    repeat: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    target = handles[FRONT[layout]]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        before = {role: await scrape_all(http, h.url) for role, h in handles.items()}
        target.snaps.clear()
        phase = await run_phase(target, config, samples, offline, n, repeat, args, args.transport)
        deltas = {
            role: metric_delta(before[role], await scrape_all(http, h.url))
            for role, h in handles.items()
        }
    first, last = target.snaps[0], target.snaps[-1]
    cpu = {role: round(last[role] - first[role], 2) for role in first}
    audio_s, wall = len(samples) / 16_000, phase["wall_s"]
    others = sum(v for role, v in cpu.items() if role != FRONT[layout] and " " not in role)
    phase.update(
        layout=layout,
        process_cpu_s=cpu,
        # Each process's CPU seconds / (calls x file seconds): % of one core per call.
        cpu_pct_per_call={r: round(100 * v / (n * audio_s), 1) for r, v in cpu.items()},
        load_pct={r: round(100 * v / wall, 1) for r, v in cpu.items()},
        # run_phase's "other" holds the idle layout's servers and the node: take them out.
        untracked_cpu_pct=round(phase["other_cpu_pct"] - 100 * others / wall, 1),
        engine=engine_figures(layout, deltas),
        metrics_delta=deltas,
    )
    node = phase["cpu_pct_per_call"].get("node")
    print(
        f"    [{layout}] {FRONT[layout]} {phase['cpu_pct_per_call'][FRONT[layout]]} %/call"
        + (f", node {node} %/call" if layout == "remote" else "")
        + f", untracked {phase['untracked_cpu_pct']} %; engine {phase['engine']}",
        file=sys.stderr,
    )
    return phase


async def _warm_node(url: str, samples: Any) -> None:
    """One request first: the node starts its decoder pool on the first upload."""
    form = aiohttp.FormData()
    form.add_field("response_format", "json")
    form.add_field("file", pcm16_wav(samples[:16_000]), filename="w.wav", content_type="audio/wav")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(f"{url}/v1/audio/transcriptions", data=form) as resp:
            await resp.read()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    restrict_host_addresses([LOOPBACK])
    load_before = os.getloadavg()[0]
    samples = read_audio(args.audio)
    machine = machine_info()  # the commit the servers start from
    layouts = args.layouts
    max_calls = max(args.calls)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        base: dict[str, Any] = (
            yaml.safe_load(args.config.read_text()) if args.config else {}
        ) or {}
        node_roles = [f"node{i + 1}" if i else "node" for i in range(args.nodes)]
        ports = {role: free_port() for role in ("single", "gateway", *node_roles)}
        raws: dict[str, dict[str, Any]] = {}
        if "inprocess" in layouts:
            raws["single"] = copy.deepcopy(base)
        if "remote" in layouts:
            for role in node_roles:
                node = copy.deepcopy(base)
                node.setdefault("limits", {})["max_file_jobs"] = args.node_file_jobs
                # Reached by the gateway only (loopback): it queues by the gateway's priorities.
                node.setdefault("server", {})["priority_hints"] = "any"
                if args.node_lanes:
                    node.setdefault("engine", {})["lanes"] = args.node_lanes
                raws[role] = node
            gateway = copy.deepcopy(base)
            gateway.setdefault("engine", {}).update(
                kind="remote",
                remote={
                    "base_url": [f"http://{LOOPBACK}:{ports[r]}/v1" for r in node_roles],
                    "timeout_s": args.remote_timeout_s,
                    "max_concurrency": args.gateway_concurrency,
                },
            )
            raws["gateway"] = gateway
        configs: dict[str, Config] = {}
        for role, raw in raws.items():
            (tmp / f"{role}-base.yaml").write_text(yaml.safe_dump(raw))
            configs[role] = loopback_config(
                tmp / f"{role}-base.yaml", ports[role], tmp / f"{role}.yaml", max_calls
            )
        call_config = configs.get("single") or configs["gateway"]  # same VAD, segmenter, WebRTC
        offline = offline_utterances(samples, call_config)
        if not offline:
            raise SystemExit(f"{args.audio}: the offline VAD pass found no speech")
        print(f"{args.audio}: {len(offline)} offline utterances", file=sys.stderr)
        phases: list[dict[str, Any]] = []
        calibration = None
        async with contextlib.AsyncExitStack() as stack:
            started: dict[str, ServerHandle] = {}
            for role in (*node_roles, "gateway", "single"):  # the nodes before their gateway
                if role in configs:
                    started[role] = await stack.enter_async_context(
                        subprocess_server(tmp / f"{role}.yaml", ports[role])
                    )
                    print(f"  {role}: {started[role].url} pid {started[role].pid}", file=sys.stderr)
            # Every node's CPU is summed as "node".
            watch = tuple(
                ("node" if role.startswith("node") else role, h.pid)
                for role, h in started.items()
                if h.pid is not None
            )
            handles = {
                role: Watched(h.url, h.pid, h.engine, watch=watch) for role, h in started.items()
            }
            engines = {role: h.engine for role, h in started.items()}
            for role in node_roles:
                if role in handles:
                    await _warm_node(handles[role].url, samples)
            for n in args.calls:
                for repeat in range(1, args.repeat + 1):
                    for layout in layout_order(layouts, repeat):
                        phases.append(
                            await _phase(
                                layout, handles, call_config, samples, offline, n, repeat, args
                            )
                        )
                        await asyncio.sleep(args.settle_s)
            if "node" in handles and args.calibrate:
                if args.quiet_pct > 0:
                    await wait_quiet(args.quiet_pct, args.quiet_wait_s)
                calibration = await calibrate(
                    handles["node"].url, offline_cuts(samples, call_config), args.calibrate
                )
    return {
        **report_header("gateway", args, machine, load_before),
        "engines": engines,
        "configs": {role: asdict(c) for role, c in configs.items()},
        **audio_header(args, samples),
        "offline": [asdict(o) for o in offline],
        "by_layout": aggregate(phases),
        "calibration": calibration,
        "phases": phases,
    }


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.median(vals)), 1) if vals else None


def aggregate(phases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layout and call count (key ``"<layout> <calls>"``): finals pooled over the runs,
    each run's p50 / p95, and the median of the runs' CPU figures per process."""
    out: dict[str, dict[str, Any]] = {}
    keys = dict.fromkeys((p["layout"], p["calls"]) for p in phases)
    for layout, n in sorted(keys, key=lambda k: (k[1], LAYOUTS.index(k[0]))):
        mine = [p for p in phases if (p["layout"], p["calls"]) == (layout, n)]
        records = [r for p in mine for c in p["call_results"] for r in c["records"]]
        runs = [p["summary"]["end_to_final_ms"] for p in mine]
        roles = mine[0]["cpu_pct_per_call"].keys()
        eng = [p["engine"] for p in mine]
        out[f"{layout} {n}"] = {
            "layout": layout,
            "calls": n,
            "runs": len(mine),
            "counts": {k: sum(p["counts"][k] for p in mine) for k in mine[0]["counts"]},
            "summary": _summaries(records),
            "run_p50": [r["p50"] for r in runs],
            "run_p95": [r["p95"] for r in runs],
            "cpu_pct_per_call": {
                r: _median([p["cpu_pct_per_call"][r] for p in mine]) for r in roles
            },
            "run_cpu_pct_per_call": {r: [p["cpu_pct_per_call"][r] for p in mine] for r in roles},
            "bench_cpu_pct": [p["bench_cpu_pct"] for p in mine],
            "untracked_cpu_pct": [p["untracked_cpu_pct"] for p in mine],
            "engine": {
                k: _median([e.get(k) for e in eng])
                for k in (
                    "final_mean_ms",
                    "interim_mean_ms",
                    "node_batch_mean_ms",
                    "beyond_node_engine_ms_per_request",
                )
            }
            | {
                k: sum(e.get(k) or 0 for e in eng)
                for k in ("final_calls", "interim_calls", "node_batches", "skipped_interims")
            },
            "wer": pooled_wer([c for p in mine for c in p["call_results"]]),
        }
    return out


# -- report --------------------------------------------------------------------------------


def _cell(s: dict[str, Any]) -> str:
    return "—" if s.get("p50") is None else f"{s['p50']:.0f} / {s['p95']:.0f}"


def _num(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _list(vs: Sequence[float | None], digits: int = 0) -> str:
    return ", ".join(_num(v, digits) for v in vs)


def render(report: dict[str, Any]) -> str:
    args, machine = report["args"], report["machine"]
    cfg = next(iter(report["configs"].values()))
    eng = cfg["engine"]
    latency_rows, cpu_rows, split_rows, engine_rows = [], [], [], []
    for agg in report["by_layout"].values():
        s, c, n = agg["summary"], agg["counts"], agg["calls"]
        layout = "gateway + node" if agg["layout"] == "remote" else "in process"
        latency_rows.append(
            [
                layout,
                n,
                agg["runs"],
                f"{c['completed']}/{c['expected']}",
                c["failed"],
                f"**{_cell(s['end_to_final_ms'])}**",
                _list(agg["run_p50"]),
                _list(agg["run_p95"]),
                _num((agg["wer"] or {}).get("pct")),
            ]
        )
        cpu = agg["cpu_pct_per_call"]
        front = cpu.get("gateway") if agg["layout"] == "remote" else cpu.get("single")
        node = cpu.get("node") if agg["layout"] == "remote" else None
        runs = agg["run_cpu_pct_per_call"]
        cpu_rows.append(
            [
                layout,
                n,
                f"**{_num(front)}** ({_list(runs[FRONT[agg['layout']]], 1)})",
                "—"
                if node is None
                else f"{_num(node)} ({_list(runs['node'], 1)}); children "
                f"{_num(cpu.get('node children'))}",
                _num(front + node) if node is not None and front is not None else _num(front),
                "—" if node is None or not front else f"**{100 / front:.1f}**",
                _list(agg["bench_cpu_pct"]),
                _list(agg["untracked_cpu_pct"]),
            ]
        )
        split_rows.append(
            [
                layout,
                n,
                *(
                    _cell(s[m])
                    for m in (
                        "end_to_stopped_ms",
                        "vad_ms",
                        "queue_ms",
                        "engine_ms",
                        "server_ms",
                        "transport_other_ms",
                    )
                ),
            ]
        )
        e = agg["engine"]
        engine_rows.append(
            [
                layout,
                n,
                f"{e['final_calls']} / {e['interim_calls']}",
                f"{_num(e['final_mean_ms'], 0)} / {_num(e['interim_mean_ms'], 0)}",
                e["skipped_interims"],
                "—" if agg["layout"] != "remote" else e["node_batches"],
                "—" if agg["layout"] != "remote" else _num(e["node_batch_mean_ms"], 0),
                "—"
                if agg["layout"] != "remote"
                else _num(e["beyond_node_engine_ms_per_request"], 0),
            ]
        )
    run_rows = [
        [
            "gateway + node" if p["layout"] == "remote" else "in process",
            p["calls"],
            p["repeat"],
            f"{p['counts']['completed']}/{p['counts']['expected']}",
            _cell(p["summary"]["end_to_final_ms"]),
            " / ".join(f"{k} {v}" for k, v in p["cpu_pct_per_call"].items() if " " not in k),
            " / ".join(f"{k} {v}" for k, v in p["load_pct"].items() if " " not in k),
            p["bench_cpu_pct"],
            p["untracked_cpu_pct"],
            p["quiet_wait_s"],
            p["wall_s"],
            ", ".join(f"{k} {v}" for k, v in (p["engine"].get("node_http_codes") or {}).items())
            or "—",
        ]
        for p in report["phases"]
    ]
    cal = report.get("calibration")
    cal_lines = []
    if cal:
        cal_lines = [
            "## The node's file pipeline, one request at a time (calibration)",
            "",
            f"{cal['requests']} requests (each offline utterance × {args['calibrate']}), "
            "posted one by one to the idle node; ms p50 / p95:",
            "",
            markdown_table(
                (
                    "round trip at the client",
                    "node engine call",
                    "rest (HTTP, decoding, VAD, cutting)",
                    "rest / round trip",
                ),
                [
                    [
                        _cell(cal["round_trip_ms"]),
                        _cell(cal["node_engine_ms"]),
                        _cell(cal["pipeline_ms"]),
                        f"{cal['pipeline_share_pct']:.1f} %",
                    ]
                ],
            ),
            "",
        ]
    quiet = (
        [
            f"- each run started once the whole machine was at most {args['quiet_pct']:g} % "
            f"busy over 1 s (waited up to {args['quiet_wait_s']:g} s)"
        ]
        if args.get("quiet_pct")
        else []
    )
    lines = [
        "# Gateway + remote engine node against the engine in process (bench/gateway.py)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), no GPU; commit "
        f"{machine['git_commit'][:12]}"
        + (
            f" with uncommitted changes to {', '.join(machine['git_dirty_files'])}"
            if machine["git_dirty"]
            else ""
        )
        + f"; 1-min load {machine['load_avg_1m'][0]:.2f} before, "
        f"{machine['load_avg_1m'][1]:.2f} after",
        f"- engines: {', '.join(f'{k} {v}' for k, v in report['engines'].items())}; embedded "
        f"engine: beam {eng['beam_size']}, lanes {eng['lanes']}, cpu_threads "
        f"{eng['cpu_threads']}, interims every {eng['interim_interval_ms']} ms, speculative "
        f"final {eng['speculative_final']}",
        f"- gateway: engine.remote max_concurrency {args['gateway_concurrency']}, timeout_s "
        f"{args['remote_timeout_s']:g}; {args.get('nodes', 1)} node(s): limits.max_file_jobs "
        f"{args['node_file_jobs']}, engine.lanes "
        f"{args.get('node_lanes') or eng['lanes']} (node CPU: all nodes summed)",
        f"- transport {args['transport']}; audio {report['audio']['path']} "
        f"({report['audio']['seconds']} s, {len(report['offline'])} utterances); "
        f"{args['repeat']} run(s) per layout and call count, layouts alternating (order "
        "flipped every other repetition); starts staggered 0–"
        f"{args['stagger_ms']:.0f} ms",
        *quiet,
        "",
        "## End of speech → `completed` at the client (ms)",
        "",
        markdown_table(
            (
                "layout",
                "calls",
                "runs",
                "finals",
                "failed",
                "pooled p50 / p95",
                "each run's p50",
                "each run's p95",
                "WER %",
            ),
            latency_rows,
        ),
        "",
        "## CPU per call (% of one core: CPU seconds / (calls × file seconds); median of runs, "
        "each run)",
        "",
        markdown_table(
            (
                "layout",
                "calls",
                "gateway (or single server)",
                "node, with its decoder children (of which children)",
                "total",
                "calls per gateway core",
                "bench %",
                "untracked other %",
            ),
            cpu_rows,
        ),
        "",
        "## End of speech → final, split (ms, p50 / p95)",
        "",
        markdown_table(
            (
                "layout",
                "calls",
                "→ speech_stopped",
                "VAD hangover",
                "queue",
                "engine (remote: round trip)",
                "server",
                "transport/other",
            ),
            split_rows,
        ),
        "",
        "## Engine calls (from /metrics)",
        "",
        markdown_table(
            (
                "layout",
                "calls",
                "finals / interims run (remote: requests answered)",
                "mean ms final / interim",
                "interims skipped",
                "node engine calls",
                "node mean engine call ms",
                "round trip beyond the node's engine, ms per request",
            ),
            engine_rows,
        ),
        "",
        *cal_lines,
        "## Runs",
        "",
        markdown_table(
            (
                "layout",
                "calls",
                "run",
                "finals",
                "p50 / p95 ms",
                "CPU % core per call",
                "load % (200 = both cores)",
                "bench %",
                "untracked %",
                "quiet wait s",
                "wall s",
                "node HTTP errors",
            ),
            run_rows,
        ),
        "",
        "*calls per gateway core* = 100 / the gateway's CPU % per call. *untracked other %* = "
        "the machine's busy time minus the three servers and the bench (noise). On this "
        "machine the node shares the same cores with the gateway and the clients.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End of speech -> completed and CPU per call: a gateway with a remote "
        "engine node against the same engine in process, alternating in one run (127.0.0.1).",
        epilog="example: .venv/bin/python bench/gateway.py --calls 1 4 8 --repeat 3 --quiet-pct 25",
    )
    p.add_argument("--audio", type=Path, default=REPO_ROOT / "tests/data/beckett.wav")
    p.add_argument("--calls", type=int, nargs="+", default=[1, 4], help="call counts (1 4)")
    p.add_argument(
        "--layout",
        dest="layouts_arg",
        default="inprocess,remote",
        help="inprocess, remote or both comma-separated (default: inprocess,remote)",
    )
    p.add_argument("--transport", type=_transport_arg, default="webrtc", help="webrtc|ws|twilio")
    p.add_argument("--repeat", type=int, default=3, help="runs per layout and count (3)")
    p.add_argument("--config", type=Path, help="base YAML for all servers (default: defaults)")
    p.add_argument(
        "--node-file-jobs", type=int, default=32, help="the node's limits.max_file_jobs (32)"
    )
    p.add_argument("--nodes", type=int, default=1, help="engine nodes behind the gateway (1)")
    p.add_argument(
        "--node-lanes",
        type=int,
        default=0,
        help="the nodes' engine.lanes (default: 0 = the config's; a node with more than one "
        "lane keeps lane 0 for live finals, the gateway's X-Voxtral-Priority: final requests)",
    )
    p.add_argument(
        "--gateway-concurrency",
        type=int,
        default=16,
        help="the gateway's engine.remote.max_concurrency (16, the default)",
    )
    p.add_argument(
        "--remote-timeout-s", type=float, default=10.0, help="engine.remote.timeout_s (10)"
    )
    p.add_argument(
        "--calibrate",
        type=int,
        default=3,
        help="post each utterance to the idle node this many times at the end (3; 0: off)",
    )
    p.add_argument("--stagger-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tail-timeout-s", type=float, default=0.0)
    p.add_argument("--match-tolerance-ms", type=float, default=400.0)
    p.add_argument("--ws-chunk-ms", type=int, default=50)
    p.add_argument("--settle-s", type=float, default=1.0)
    add_run_args(p)
    args = p.parse_args(argv)
    args.layouts = tuple(dict.fromkeys(x.strip() for x in args.layouts_arg.split(",") if x))
    if not args.layouts or any(x not in LAYOUTS for x in args.layouts):
        p.error(f"--layout: use {', '.join(LAYOUTS)} or both comma-separated")
    if "," in args.transport:
        p.error("--transport: one transport per run here")
    return check_run_args(p, args)


def main(argv: list[str] | None = None) -> int:
    return run_bench("gateway", parse_args(argv), bench, render)


if __name__ == "__main__":
    sys.exit(main())

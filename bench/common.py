"""Helpers shared by the benchmark scripts: statistics, machine facts, CPU time, results, and
a server on loopback (as a subprocess, so its CPU time is its own, or in process).

Every benchmark prints a markdown table and saves the same figures twice under
``bench/results/``: ``<name>-<UTC timestamp>.json`` (everything, for later analysis) and
``.md`` (the tables, as quoted in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import yaml

from agent.config import ENV_PREFIX, Config, load_config
from agent.errors import ConfigError
from voxtral_rtc_client.text import normalise

if TYPE_CHECKING:  # the segmenter pulls in the VAD: loaded only where cuts are made
    from agent.segmenter import Utterance

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # engine load + warm-up
IDLE_TIMEOUT_S = 45.0  # a call's server-side drain may take 30 s


@dataclass(frozen=True)
class Summary:
    """Count and percentiles of one metric; the percentiles are ``None`` when ``n == 0``."""

    n: int
    p50: float | None
    p95: float | None
    mean: float | None
    max: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "p50": self.p50, "p95": self.p95, "mean": self.mean, "max": self.max}

    def cell(self, digits: int = 0) -> str:
        """``p50 / p95`` for a table cell, ``—`` with no data."""
        if self.p50 is None or self.p95 is None:
            return "—"
        return f"{self.p50:.{digits}f} / {self.p95:.{digits}f}"


def summarize(values: Iterable[float]) -> Summary:
    """Percentiles with linear interpolation between closest ranks (numpy's default)."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return Summary(0, None, None, None, None)
    return Summary(
        n=int(data.size),
        p50=round(float(np.percentile(data, 50)), 1),
        p95=round(float(np.percentile(data, 95)), 1),
        mean=round(float(data.mean()), 1),
        max=round(float(data.max()), 1),
    )


def word_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """Word errors (substitutions + deletions + insertions, the word-level edit distance)
    of ``hypothesis`` against ``reference``, both normalised as the tests normalise them
    (lowercase, punctuation stripped), and the reference's word count: WER = errors / words."""
    hyp, ref = normalise(hypothesis).split(), normalise(reference).split()
    row = list(range(len(hyp) + 1))  # distances from ref[:0] to each prefix of hyp
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    align = ["---:" if i else ":---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def process_cpu_seconds(pid: int | None = None, children: bool = False) -> float:
    """User + system CPU time of a whole process (all its threads), from ``/proc/PID/stat``.

    ``children``: plus that of its children that have exited and been waited for
    (``cutime`` + ``cstime``; a server's file decoder processes, one per request). A child
    is counted when it is reaped, not while it runs."""
    stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    # The command name (field 2) may hold spaces: count fields after its closing ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    if children:
        utime += int(fields[13]) + int(fields[14])  # cutime, cstime: fields 16 and 17
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def offline_cuts(samples: Any, config: Config) -> list[Utterance]:
    """The server's own VAD and segmenter, with its options, over a whole file: its
    ``Utterance`` cuts (pre-roll and hangover included), as a live call would make them."""
    return [cut for cut, _ in offline_finals(samples, config)]


def offline_finals(samples: Any, config: Config) -> list[tuple[Utterance, Any]]:
    """Each of ``offline_cuts``' cuts with the audio its live final decodes: with
    ``engine.speculative_final`` on, a cut on silence is decoded on its last pause's audio
    (``SpeechPaused``, the decode started before the hangover ended), any other on its own."""
    from agent.detector import SpeechDetector
    from agent.segmenter import SegmenterOptions, SpeechPaused, Utterance
    from agent.vad import SileroVad

    options = SegmenterOptions.from_config(config.vad, config.segmenter)
    detector = SpeechDetector(SileroVad(config.vad.model_path).stream(), options)
    finals: list[tuple[Utterance, Any]] = []
    paused: dict[int, Any] = {}
    for ev in [*detector.process(samples), *detector.flush()]:
        if isinstance(ev, SpeechPaused):
            paused[ev.index] = ev.audio
        elif isinstance(ev, Utterance):
            pause = paused.pop(ev.index, None)
            speculative = config.engine.speculative_final and ev.cut == "silence"
            finals.append((ev, pause if speculative and pause is not None else ev.audio))
    return finals


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare figures between machines."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty),
        # Tracked files that differ from the commit (the code a server started from may hold
        # uncommitted work: this says which files, not what was in them).
        # (``_git`` strips the output, and with it the first line's leading status blank.)
        "git_dirty_files": [line.split(maxsplit=1)[1] for line in dirty.splitlines()],
    }


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def save_results(
    name: str, data: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write ``<name>-<stamp>.json`` and ``.md`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}-{utc_stamp()}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path


def system_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy (``/proc/stat``, every core)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle, iowait = ticks[3], ticks[4]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


# -- a server on loopback ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerHandle:
    """A running server: its base URL, its process id (for CPU time) and its engine's name."""

    url: str
    pid: int | None  # None: in this process, whose CPU also holds the benchmark's own
    engine: str

    def cpu_seconds(self) -> float | None:
        return None if self.pid is None else process_cpu_seconds(self.pid)


def loopback_config(base: Path | None, port: int, out: Path, max_calls: int = 0) -> Config:
    """The base YAML (or the defaults) forced onto loopback, written to ``out`` for the server.

    Listens on 127.0.0.1, gathers ICE host candidates on 127.0.0.1 only and uses no STUN/TURN
    server, so no packet of a benchmark leaves the machine. ``limits.max_calls`` is raised to
    ``max_calls`` and the per-IP offer rate limit is lifted (all calls come from 127.0.0.1).
    ``VOXTRAL_RTC_*`` variables are ignored here and stripped from the server's environment:
    the file is the whole config.
    """
    raw: dict[str, Any] = (yaml.safe_load(base.read_text()) if base else None) or {}
    raw.setdefault("server", {}).update(host=LOOPBACK, port=port)
    # No STUN/TURN and loopback-only host candidates: no packet leaves 127.0.0.1.
    raw.setdefault("webrtc", {}).update(host_addresses=[LOOPBACK], ice_servers=[])
    limits = raw.setdefault("limits", {})
    limits["max_calls"] = max(int(limits.get("max_calls", Config().limits.max_calls)), max_calls)
    if hasattr(Config().limits, "offers_per_minute_per_ip"):
        limits["offers_per_minute_per_ip"] = 0  # every call of a benchmark comes from one IP
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(out, environ={})


@contextlib.asynccontextmanager
async def subprocess_server(config_path: Path, port: int) -> AsyncIterator[ServerHandle]:
    """``python -m signaling.cli serve``: its own process, so its CPU time is its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = config_path.with_suffix(".log")
    log_file = await asyncio.to_thread(log_path.open, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "signaling.cli", "serve", "--config", str(config_path)),
            *("--port", str(port)),
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    finally:
        log_file.close()  # the child holds its own copy
    url = f"http://{LOOPBACK}:{port}"
    try:
        engine = await wait_ready(url, proc, log_path)
        yield ServerHandle(url, proc.pid, engine)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)


@contextlib.asynccontextmanager
async def inprocess_server(config: Config) -> AsyncIterator[ServerHandle]:
    """``signaling.app.start_server`` in this process and event loop."""
    from signaling.app import start_server

    server = await asyncio.wait_for(start_server(config), READY_TIMEOUT_S)
    try:
        assert server.state.worker is not None
        yield ServerHandle(server.url, None, server.state.worker.engine.name)
    finally:
        await asyncio.wait_for(server.stop(), 60)


async def wait_ready(url: str, proc: asyncio.subprocess.Process, log_path: Path) -> str:
    """Poll ``/readyz`` until 200 (returns the engine name); fail if the process exits."""
    deadline = time.perf_counter() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.perf_counter() < deadline:
            if proc.returncode is not None:
                tail = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-2000:]
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return str((await resp.json()).get("engine", "?"))
            await asyncio.sleep(0.2)
    raise TimeoutError(f"server not ready within {READY_TIMEOUT_S:.0f} s (log: {log_path})")


async def wait_idle(url: str, timeout_s: float = IDLE_TIMEOUT_S, sockets: bool = False) -> None:
    """Until the server holds no call (``/healthz``), e.g. before reading its CPU time.

    ``/healthz`` counts WebRTC calls only; with ``sockets`` the wait is also for every
    ``/v1/realtime`` session to be released (``voxtral_rtc_calls_active`` on ``/metrics``
    counts both)."""
    deadline = time.perf_counter() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.perf_counter() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{url}/healthz") as resp:
                    idle = (await resp.json()).get("calls") == 0
                if idle and sockets:
                    idle = await live_sessions(http, url) == 0
                if idle:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"server still holds calls after {timeout_s:.0f} s")


async def live_sessions(http: aiohttp.ClientSession, url: str) -> int | None:
    """Calls and WebSocket sessions in progress (``voxtral_rtc_calls_active``), or ``None``."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("voxtral_rtc_calls_active "):
            return int(float(line.split()[1]))
    return None


async def wait_quiet(
    max_busy_pct: float, timeout_s: float, window_s: float = 1.0
) -> tuple[float, float]:
    """On a shared machine: wait until the whole machine's busy CPU over ``window_s`` is at
    most ``max_busy_pct`` % of one core (call it while the benchmark itself is idle), for at
    most ``timeout_s``. Returns the seconds waited and the last busy share measured."""
    t0 = time.perf_counter()
    while True:
        busy0 = system_busy_seconds()
        await asyncio.sleep(window_s)
        busy_pct = 100 * (system_busy_seconds() - busy0) / window_s
        waited = time.perf_counter() - t0
        if busy_pct <= max_busy_pct or waited >= timeout_s:
            return round(waited, 1), round(busy_pct, 1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (results stay machine-neutral)."""
    path = path.absolute()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def lost_finals(report: dict[str, Any]) -> int:
    """Finals missing or failed over a report's phases (``latency``/``gateway`` reports)."""
    return sum(p["counts"]["missing"] + p["counts"]["failed"] for p in report["phases"])


def run_bench(
    name: str,
    args: argparse.Namespace,
    bench: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    lost: Callable[[dict[str, Any]], int] = lost_finals,
) -> int:
    """A benchmark's ``main``: run it, print its markdown, save the results (unless
    ``--no-save``). Exit status 2 when it could not run (a server did not start, the machine
    never went quiet, a bad config), 1 when ``lost`` finals, else 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = asyncio.run(bench(args))
    except (RuntimeError, TimeoutError, ConfigError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    markdown = render(report)
    print(markdown)
    if not args.no_save:
        for path in save_results(name, report, markdown, args.out_dir):
            print(f"saved {shown_path(path)}")
    return 1 if lost(report) else 0


# -- the arguments every call benchmark takes --------------------------------------------


def add_quiet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet-pct",
        type=float,
        default=0.0,
        help="before each run, wait until the whole machine's busy CPU over 1 s is at most "
        "this %% of one core (a shared machine; default: 0 = do not wait)",
    )
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=120.0,
        help="longest wait for --quiet-pct; the run then starts anyway (default: 120)",
    )


#: beckett.wav's transcript, from ``../shared/audio/README.md``.
BECKETT_REFERENCE = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


def add_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference",
        type=Path,
        help="text file with what the audio says, for the word error rate (default: the "
        "audio's .txt beside it, e.g. from bench/make_joined_speech.py; beckett.wav's own "
        "transcript for beckett.wav; otherwise no WER)",
    )


def reference_info(args: argparse.Namespace) -> dict[str, str] | None:
    """The reference text for ``args.audio`` and where it came from (see ``--reference``)."""
    sidecar = args.audio.with_suffix(".txt")
    if args.reference is not None:
        return {"text": args.reference.read_text().strip(), "source": shown_path(args.reference)}
    if sidecar.is_file():
        return {"text": sidecar.read_text().strip(), "source": shown_path(sidecar)}
    if args.audio.name == "beckett.wav":
        return {"text": BECKETT_REFERENCE, "source": "../shared/audio/README.md"}
    return None


def add_run_args(p: argparse.ArgumentParser) -> None:
    """``--reference``, ``--quiet-pct``/``--quiet-wait-s``, ``--out-dir``, ``--no-save``."""
    add_reference_args(p)
    add_quiet_args(p)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-save", action="store_true", help="print the table only")


def check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse counts below one; set ``args.reference_text`` (None: no WER)."""
    if min(args.calls) < 1 or args.repeat < 1:
        p.error("--calls and --repeat must be >= 1")
    reference = reference_info(args)
    args.reference_text = None if reference is None else reference["text"]
    return args


def report_header(
    name: str, args: argparse.Namespace, machine: dict[str, Any], load_before: float
) -> dict[str, Any]:
    """The first keys of a call benchmark's report: what ran, when, how, on what."""
    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": shlex.join([shown_path(Path(sys.executable)), *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {**machine, "load_avg_1m": [load_before, os.getloadavg()[0]]},
    }


def audio_header(args: argparse.Namespace, samples: Sized) -> dict[str, Any]:
    """The report's ``audio`` (16 kHz samples) and ``reference`` keys."""
    return {
        "audio": {"path": shown_path(args.audio), "seconds": round(len(samples) / 16_000, 2)},
        "reference": reference_info(args),
    }

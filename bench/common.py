"""Helpers shared by the benchmark scripts: statistics, machine facts, process CPU, results.

Every benchmark prints a markdown table and saves the same figures twice under
``bench/results/``: ``<name>-<UTC timestamp>.json`` (everything, for later analysis) and
``.md`` (the tables, as quoted in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


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


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    align = ["---:" if i else ":---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a whole process (all its threads), from ``/proc/PID/stat``."""
    stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    # The command name (field 2) may hold spaces: count fields after its closing ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


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
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
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

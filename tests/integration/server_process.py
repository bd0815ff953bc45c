"""Real servers for integration tests. ``voxtral-rtc serve`` as processes: start one from a
YAML config or an environment, wait for ``/readyz``, read its metrics, end it by its PID;
and servers in the test's own process (``Servers``).

Every process listens on 127.0.0.1; the parent's ``VOXTRAL_RTC_*`` variables are never
passed on (each process gets exactly the configuration its test gives). The
``server_processes`` fixture (``conftest.py``) starts them and ends them all after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ENV_PREFIX, Config
from agent.engines.base import Engine
from signaling.app import RunningServer, start_server

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
READY_S = 90.0

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """One ``voxtral-rtc serve`` process."""

    proc: asyncio.subprocess.Process
    url: str
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


async def launch(
    folder: Path, name: str, config: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> Served:
    """Start ``voxtral-rtc serve`` with ``config`` (written as ``folder/name.yaml``) and/or
    ``env`` (``VOXTRAL_RTC_*`` variables, as a container would get them). The port is the
    config's ``server.port``, else ``VOXTRAL_RTC_SERVER__PORT``."""
    env = env or {}
    args = [sys.executable, "-m", "signaling.cli", "serve"]
    if config is not None:
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config", str(path)]
        port = int(config["server"]["port"])
    else:
        port = int(env[f"{ENV_PREFIX}SERVER__PORT"])
    log = folder / f"{name}.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=REPO, env={**inherited, **env}, stdout=out, stderr=out
        )
    return Served(proc, f"http://{LOOPBACK}:{port}", log)


async def wait_ready(served: Served) -> None:
    deadline = time.perf_counter() + READY_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.perf_counter() < deadline:
            assert served.alive, served.log.read_text()[-3000:]
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{served.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{served.url} not ready: {served.log.read_text()[-3000:]}")


async def end(served: Served) -> None:
    """Stop a process this test started (by its PID), whatever state it is in."""
    if not served.alive:
        return
    with contextlib.suppress(ProcessLookupError):
        served.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        served.proc.terminate()
    try:
        await asyncio.wait_for(served.proc.wait(), 20)
    except TimeoutError:
        served.proc.kill()
        await served.proc.wait()


@dataclass
class ServerProcesses:
    """Starts servers for one test; ``close`` ends them, the last started first."""

    folder: Path
    running: list[Served] = field(default_factory=list)

    async def start(
        self,
        name: str,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Served:
        served = await launch(self.folder, name, config, env)
        self.running.append(served)
        if wait:
            await wait_ready(served)
        return served

    async def close(self) -> None:
        for served in reversed(self.running):
            await end(served)


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with http.get(f"{url}/readyz") as resp:
            return resp.status, dict(await resp.json())


async def metrics(url: str, token: str | None = None) -> Metrics:
    """``/metrics`` (with the bearer ``token`` when the server has ``auth_tokens``)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(values: Metrics, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


class Servers:
    """Starts servers in this process for one test; ``close`` stops them all."""

    def __init__(self) -> None:
        self.running: list[RunningServer] = []

    async def start(self, config: Config, engine: Engine | None = None) -> RunningServer:
        server = await start_server(config, engine=engine)
        self.running.append(server)
        return server

    async def close(self) -> None:
        for server in reversed(self.running):
            await server.stop()

"""Fixtures shared by the integration tests: real servers, in this process
(``servers``) or as ``voxtral-rtc serve`` processes (``server_processes``), each stopped
after its test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from signaling.app import RunningServer
from tests.conftest import make_config
from tests.integration.server_process import ServerProcesses, Servers
from tests.integration.test_robustness import Echo


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Start real servers on 127.0.0.1 in this process; all are stopped after the test."""
    started = Servers()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def echo_server(servers: Servers) -> RunningServer:
    """A real server on 127.0.0.1 with the energy VAD and an engine that answers at once."""
    return await servers.start(make_config(VAD__KIND="energy"), Echo())


@pytest.fixture
async def server_processes(tmp_path: Path) -> AsyncIterator[ServerProcesses]:
    """Start ``voxtral-rtc serve`` processes (configs and logs in ``tmp_path``); all are
    ended, by their PIDs, after the test."""
    processes = ServerProcesses(tmp_path)
    try:
        yield processes
    finally:
        await processes.close()

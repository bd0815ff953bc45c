"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from signaling.app import RunningServer, start_server
from tests.conftest import make_config
from tests.integration.server_process import ServerProcesses
from tests.integration.test_robustness import Echo


@pytest.fixture
async def echo_server() -> AsyncIterator[RunningServer]:
    """A real server on 127.0.0.1 with the energy VAD and an engine that answers at once."""
    server = await start_server(make_config(VAD__KIND="energy"), engine=Echo())
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def server_processes(tmp_path: Path) -> AsyncIterator[ServerProcesses]:
    """Start ``voxtral-rtc serve`` processes (configs and logs in ``tmp_path``); all are
    ended, by their PIDs, after the test."""
    processes = ServerProcesses(tmp_path)
    try:
        yield processes
    finally:
        await processes.close()

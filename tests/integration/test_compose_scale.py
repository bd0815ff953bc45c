"""``docker/compose.scale.yaml`` without Docker (these machines have no Docker engine): its
environment is a valid configuration for every service, every file it names exists, and
the services it describes, started as real ``python -m signaling.cli serve`` processes with
exactly that environment (ports moved to free ones on 127.0.0.1), transcribe a live
WebSocket session on each gateway through the engine node.

What this does not run: the image build (``docker/Dockerfile.cpu``) and Docker's host
networking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import yaml

from agent.config import ENV_PREFIX, load_config
from agent.errors import ConfigError
from tests.integration.server_process import (
    LOOPBACK,
    REPO,
    ServerProcesses,
    free_port,
    metric,
    metrics,
)
from tests.integration.test_realtime_ws import COMPLETED, Socket, assert_phrases, encode

COMPOSE = REPO / "docker/compose.scale.yaml"
PORT_KEY = f"{ENV_PREFIX}SERVER__PORT"
HOST_KEY = f"{ENV_PREFIX}SERVER__HOST"


def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE.read_text())  # resolves the anchors and << merges
    return dict(compose["services"])


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_every_environment_key_is_a_valid_config_key_and_every_path_exists() -> None:
    found = services()
    assert set(found) == {"engine", "gateway-1", "gateway-2"}
    for name, service in found.items():
        env = environment(service)
        assert env and all(k.startswith(ENV_PREFIX) for k in env), (name, env)
        config = load_config(environ=env)  # unknown keys and bad values raise ConfigError
        assert config.server.port == int(env[PORT_KEY])
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == REPO, (name, context)
        assert (context / service["build"]["dockerfile"]).is_file(), name
        assert service["network_mode"] == "host"
        if name.startswith("gateway"):
            assert config.engine.kind == "remote"
            assert service["depends_on"] == ["engine"]
    # The check can fail: a misspelt key or a bad value is refused.
    with pytest.raises(ConfigError):
        load_config(environ={f"{ENV_PREFIX}SERVER__PRIORITY_HINT": "any"})
    with pytest.raises(ConfigError):
        load_config(environ={f"{ENV_PREFIX}SERVER__PRIORITY_HINTS": "everyone"})


def moved(found: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Each service's environment, exactly, but for its port (a free one) and the gateways'
    node URL (the node's new port), all on 127.0.0.1."""
    envs = {name: environment(service) for name, service in found.items()}
    ports = {name: free_port() for name in envs}
    node_old = f"{LOOPBACK}:{envs['engine'][PORT_KEY]}"
    node_new = f"{LOOPBACK}:{ports['engine']}"
    for name, env in envs.items():
        env[PORT_KEY] = str(ports[name])
        # Docker's host networking: every service is on this machine's loopback here.
        assert env.get(HOST_KEY, LOOPBACK) == LOOPBACK
        env[HOST_KEY] = LOOPBACK
        for key, value in env.items():
            if key != PORT_KEY:
                env[key] = value.replace(node_old, node_new)
    return envs


async def transcribe_on(gateway_url: str, audio: npt.NDArray[np.float32]) -> None:
    """beckett.wav over ``/v1/realtime`` (pcm16 24 kHz, server VAD): the six phrases."""
    ws_url = gateway_url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    async with aiohttp.ClientSession() as http:
        sock = Socket(await http.ws_connect(ws_url))
        try:
            await sock.wait("session.created")
            await sock.stream(encode(audio, "pcm16") + bytes(48_000 * 3), 48_000)
            assert_phrases(await sock.wait(COMPLETED, 6, timeout=90))
            assert not sock.of_type("error")
        finally:
            await sock.close()


async def test_the_compose_services_as_processes_transcribe_through_the_node(
    server_processes: ServerProcesses, beckett_audio: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    envs = moved(services())
    node = await server_processes.start("engine", env=envs["engine"])
    gateways = [await server_processes.start(g, env=envs[g]) for g in ("gateway-1", "gateway-2")]
    for gateway in gateways:
        await transcribe_on(gateway.url, beckett_audio)
        values = await metrics(gateway.url)
        assert metric(values, "voxtral_rtc_engine_finals_total", outcome="completed") == 6
    # Both gateways' finals were the node's, queued as finals (it trusts them: any).
    node_values = await metrics(node.url)
    finals = metric(node_values, "voxtral_rtc_engine_batch_seconds_count", priority="final")
    assert finals >= 12

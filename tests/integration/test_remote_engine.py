"""``engine.kind: remote`` between two real processes: a gateway (``voxtral-rtc serve`` with
the remote engine) takes a live WebRTC call, and engine nodes (``voxtral-rtc serve`` with the
embedded engine) transcribe its utterances over ``/v1/audio/transcriptions``. Nodes are
killed, restarted, stopped (SIGSTOP) and doubled; everything listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ENV_PREFIX
from agent.transports.webrtc_peer import restrict_host_addresses
from tests.conftest import BECKETT_PHRASES, normalise
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
EV = "conversation.item.input_audio_transcription"
COMPLETED, FAILED = f"{EV}.completed", f"{EV}.failed"
READY_S = 90.0
#: Codes a node counts (``voxtral_rtc_errors_total{source="http"}``) for a request whose
#: client went away: mid-handler, or while its body was still being read.
CLIENT_LEFT = ("client_closed_request", "upload_aborted")


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


def base_config(port: int) -> dict[str, Any]:
    return {
        "server": {"host": LOOPBACK, "port": port, "shutdown_grace_s": 2},
        "webrtc": {"host_addresses": [LOOPBACK]},
    }


def node_config(port: int) -> dict[str, Any]:
    config = base_config(port)
    # One replica each (2-core machines); file jobs for every request a gateway may send.
    config["engine"] = {"lanes": 1}
    config["limits"] = {"max_file_jobs": 8}
    return config


def gateway_config(port: int, urls: list[str], **remote: Any) -> dict[str, Any]:
    config = base_config(port)
    config["engine"] = {
        "kind": "remote",
        "remote": {"base_url": urls, "timeout_s": 10, "max_concurrency": 4, **remote},
    }
    return config


async def launch(tmp_path: Path, name: str, config: dict[str, Any], wait: bool = True) -> Served:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "signaling.cli", "serve", "--config", str(path)),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
        )
    served = Served(proc, f"http://{LOOPBACK}:{config['server']['port']}", log)
    if wait:
        await ready(served)
    return served


async def ready(served: Served) -> None:
    deadline = time.perf_counter() + READY_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.perf_counter() < deadline:
            assert served.proc.returncode is None, served.log.read_text()[-3000:]
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{served.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{served.url} not ready: {served.log.read_text()[-3000:]}")


async def end(served: Served) -> None:
    """Stop a process this test started (by its PID), whatever state it is in."""
    if served.proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        served.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        served.proc.terminate()
    try:
        await asyncio.wait_for(served.proc.wait(), 20)
    except TimeoutError:
        served.proc.kill()
        await served.proc.wait()


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[Served]]:
    started: list[Served] = []
    try:
        yield started
    finally:
        for served in reversed(started):
            await end(served)


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with http.get(f"{url}/readyz") as resp:
            return resp.status, dict(await resp.json())


async def wait_readyz(url: str, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.perf_counter() + timeout
    while True:
        _, body = await readyz(url)
        if body["status"] == status or time.perf_counter() > deadline:
            assert body["status"] == status, body
            return body
        await asyncio.sleep(0.1)


async def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_served(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    """Engine calls a node made for ``/v1/audio/transcriptions`` (file priority)."""
    return metric(values, "voxtral_rtc_engine_batch_seconds_count", priority="file")


def aborted_by_client(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(
        metric(values, "voxtral_rtc_errors_total", source="http", code=c) for c in CLIENT_LEFT
    )


async def finished_items(client: RealtimeClient, n: int, timeout: float = 60.0) -> None:
    """Wait until ``n`` items have their ``completed`` or ``failed``."""
    deadline = time.perf_counter() + timeout
    while len(client.of_type(COMPLETED)) + len(client.of_type(FAILED)) < n:
        await client.next_event(timeout=max(0.1, deadline - time.perf_counter()))


def phrases(client: RealtimeClient) -> list[str]:
    # tiny.en sometimes hears "fail" as "bail".
    return [normalise(c["transcript"]).replace("bail", "fail") for c in client.of_type(COMPLETED)]


@contextlib.asynccontextmanager
async def call(url: str, audio: npt.NDArray[np.float32]) -> AsyncIterator[RealtimeClient]:
    restrict_host_addresses([LOOPBACK])  # this process's client peer: loopback only
    client = RealtimeClient(url)
    try:
        await client.connect(ArrayAudioTrack(audio))
        yield client
    finally:
        await client.close()


async def test_a_live_call_on_a_gateway_is_transcribed_by_an_engine_node(
    tmp_path: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with processes() as running:
        node = await launch(tmp_path, "node", node_config(free_port()))
        running.append(node)
        gateway = await launch(tmp_path, "gateway", gateway_config(free_port(), [node.v1]))
        running.append(gateway)
        status, body = await readyz(gateway.url)
        assert (status, body["engine"]) == (200, "remote")
        before = requests_served(await metrics(node.url))
        async with call(gateway.url, beckett_audio) as client:
            await finished_items(client, 6)
            assert phrases(client) == BECKETT_PHRASES
            assert not client.of_type(FAILED)
            created = client.of_type("session.created")[0]
            assert created["session"]["input_audio_transcription"]["model"] == "remote"
            timings = client.of_type(COMPLETED)[0]["timings"]
            assert timings["engine_ms"] > 0 and timings["queue_ms"] >= 0
        # The node did the decoding: six finals and the interims, each one request.
        assert requests_served(await metrics(node.url)) - before >= 6
        gw = await metrics(gateway.url)
        assert metric(gw, "voxtral_rtc_engine_finals_total", outcome="completed") == 6
        assert metric(gw, "voxtral_rtc_engine_degraded") == 0


async def test_node_killed_mid_call_then_restarted(
    tmp_path: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    node_port = free_port()
    async with processes() as running:
        node = await launch(tmp_path, "node", node_config(node_port))
        running.append(node)
        gateway = await launch(tmp_path, "gateway", gateway_config(free_port(), [node.v1]))
        running.append(gateway)
        async with call(gateway.url, beckett_audio) as client:
            first = await client.next_event(COMPLETED, timeout=30)
            assert normalise(first.event["transcript"]) == "ever tried"
            node.proc.kill()
            await node.proc.wait()
            await finished_items(client, 6)
            failed = client.of_type(FAILED)
            assert failed, "nothing failed with the only node dead"
            assert {f["error"]["code"] for f in failed} == {"engine_unavailable"}
            assert len(client.of_type(COMPLETED)) + len(failed) == 6
            body = await wait_readyz(gateway.url, "degraded", timeout=5)
            assert body["engine"] == "remote"
            gw = await metrics(gateway.url)
            assert metric(gw, "voxtral_rtc_engine_degraded") == 1
            assert metric(gw, "voxtral_rtc_calls_active") == 1  # the call goes on
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{gateway.url}/healthz") as resp:
                    assert resp.status == 200 and (await resp.json())["calls"] == 1
            # Degraded means an utterance fails at once, not after retries and timeouts.
            t0 = time.perf_counter()
            async with aiohttp.ClientSession() as http:
                data = aiohttp.FormData()
                data.add_field(
                    "file",
                    (REPO / "tests/data/beckett.wav").read_bytes(),
                    filename="b.wav",
                    content_type="audio/wav",
                )
                async with http.post(f"{gateway.url}/v1/audio/transcriptions", data=data) as resp:
                    assert resp.status == 503
                    assert (await resp.json())["error"]["code"] == "engine_unavailable"
            assert time.perf_counter() - t0 < 2.0

        node = await launch(tmp_path, "node-again", node_config(node_port))
        running.insert(0, node)
        await wait_readyz(gateway.url, "ready", timeout=15)
        assert metric(await metrics(gateway.url), "voxtral_rtc_engine_degraded") == 0
        async with call(gateway.url, beckett_audio) as client:
            await finished_items(client, 6)
            assert phrases(client) == BECKETT_PHRASES
            assert not client.of_type(FAILED)
        assert proc_alive(gateway)


def proc_alive(served: Served) -> bool:
    return served.proc.returncode is None


async def test_a_stalled_node_fails_items_with_engine_timeout(
    tmp_path: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with processes() as running:
        node = await launch(tmp_path, "node", node_config(free_port()))
        running.append(node)
        gateway = await launch(
            tmp_path, "gateway", gateway_config(free_port(), [node.v1], timeout_s=1.5)
        )
        running.append(gateway)
        node.proc.send_signal(signal.SIGSTOP)  # end() sends SIGCONT before SIGTERM
        try:
            async with call(gateway.url, beckett_audio[: 16000 * 3]) as client:
                failed = await client.next_event(FAILED, timeout=20)
                assert failed.event["error"]["code"] == "engine_timeout"
                # The gateway's loop never waited on the node: it answers at once.
                t0 = time.perf_counter()
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{gateway.url}/healthz") as resp:
                        assert resp.status == 200
                assert time.perf_counter() - t0 < 0.5
                await finished_items(client, 2, timeout=20)
                assert not client.of_type(COMPLETED)
                codes = {f["error"]["code"] for f in client.of_type(FAILED)}
                assert codes <= {"engine_timeout", "engine_unavailable"}, codes
            gw = await metrics(gateway.url)
            assert metric(gw, "voxtral_rtc_engine_timeouts_total") >= 1
        finally:
            node.proc.send_signal(signal.SIGCONT)


async def test_two_nodes_one_killed_mid_call_every_utterance_served(
    tmp_path: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with processes() as running:
        first = await launch(tmp_path, "node-a", node_config(free_port()))
        running.append(first)
        second = await launch(tmp_path, "node-b", node_config(free_port()))
        running.append(second)
        gateway = await launch(
            tmp_path, "gateway", gateway_config(free_port(), [first.v1, second.v1])
        )
        running.append(gateway)
        async with call(gateway.url, beckett_audio) as client:
            await client.next_event(COMPLETED, timeout=30)
            # Both took requests so far: the load is shared, not stacked on the first.
            assert requests_served(await metrics(first.url)) >= 1
            assert requests_served(await metrics(second.url)) >= 1
            first.proc.kill()
            await first.proc.wait()
            await finished_items(client, 6)
            assert phrases(client) == BECKETT_PHRASES
            assert not client.of_type(FAILED)
        status, body = await readyz(gateway.url)
        assert (status, body["status"]) == (200, "ready")  # one server left is enough

        # A dead one from the start is skipped: the gateway starts ready and serves.
        gateway2 = await launch(
            tmp_path, "gateway2", gateway_config(free_port(), [first.v1, second.v1])
        )
        running.append(gateway2)
        assert (await readyz(gateway2.url))[0] == 200
        async with call(gateway2.url, beckett_audio[: int(16000 * 3.2)]) as client:
            await finished_items(client, 2)
            assert phrases(client) == BECKETT_PHRASES[:2]


async def test_a_withdrawn_speculative_decode_aborts_its_request_on_the_node(
    tmp_path: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """The gateway waits 1.5 s of silence before ending a turn, so beckett's 0.7 s gaps are
    pauses: each starts a speculative final that the next phrase withdraws. The node is
    stopped (SIGSTOP) across the first gap, so that decode is still in flight when speech
    resumes; the gateway must abort it, and the node, let go, sees its client gone."""
    async with processes() as running:
        node = await launch(tmp_path, "node", node_config(free_port()))
        running.append(node)
        config = gateway_config(free_port(), [node.v1], timeout_s=30)
        config["engine"]["interim_interval_ms"] = 0  # no interims: only speculations go out
        config["segmenter"] = {"min_silence_ms": 1500}
        gateway = await launch(tmp_path, "gateway", config)
        running.append(gateway)
        assert aborted_by_client(await metrics(node.url)) == 0
        restrict_host_addresses([LOOPBACK])
        track = ArrayAudioTrack(beckett_audio)
        async with RealtimeClient(gateway.url) as client:
            await client.connect(track)
            await client.next_event("input_audio_buffer.speech_started", timeout=20)
            node.proc.send_signal(signal.SIGSTOP)
            try:
                assert track.started_at is not None
                # The first gap is 1.22-1.89 s of the audio: resume once speech is back.
                await asyncio.sleep(track.started_at + 2.6 - time.perf_counter())
            finally:
                node.proc.send_signal(signal.SIGCONT)
            deadline = time.perf_counter() + 10
            while not aborted_by_client(await metrics(node.url)):
                assert time.perf_counter() < deadline, "the node saw no request aborted"
                await asyncio.sleep(0.2)
            # The call goes on: one turn (no gap reached 1.5 s), transcribed whole.
            done = await client.next_event(COMPLETED, timeout=30)
            text = normalise(done.event["transcript"]).replace("bail", "fail")
            assert text.startswith("ever tried") and text.endswith("fail better"), text
            assert not client.of_type(FAILED)

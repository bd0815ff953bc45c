"""``engine.kind: remote`` between two real processes: a gateway (``voxtral-rtc serve`` with
the remote engine) takes a live WebRTC call, and engine nodes (``voxtral-rtc serve`` with the
embedded engine) transcribe its utterances over ``/v1/audio/transcriptions``. Nodes are
killed, restarted, stopped (SIGSTOP) and doubled; everything listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from agent.transports.webrtc_peer import restrict_host_addresses
from tests.conftest import BECKETT_PHRASES, normalise
from tests.integration.server_process import (
    LOOPBACK,
    REPO,
    Metrics,
    ServerProcesses,
    free_port,
    metric,
    metrics,
    readyz,
)
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

EV = "conversation.item.input_audio_transcription"
COMPLETED, FAILED = f"{EV}.completed", f"{EV}.failed"
#: Codes a node counts (``voxtral_rtc_errors_total{source="http"}``) for a request whose
#: client went away: mid-handler, or while its body was still being read.
CLIENT_LEFT = ("client_closed_request", "upload_aborted")


def base_config(port: int) -> dict[str, Any]:
    return {
        "server": {"host": LOOPBACK, "port": port, "shutdown_grace_s": 2},
        "webrtc": {"host_addresses": [LOOPBACK]},
    }


def node_config(port: int) -> dict[str, Any]:
    config = base_config(port)
    # Only the gateways reach it (loopback): it queues by their priorities.
    config["server"]["priority_hints"] = "any"
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


async def wait_readyz(url: str, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.perf_counter() + timeout
    while True:
        _, body = await readyz(url)
        if body["status"] == status or time.perf_counter() > deadline:
            assert body["status"] == status, body
            return body
        await asyncio.sleep(0.1)


def engine_calls(values: Metrics, priority: str) -> float:
    return metric(values, "voxtral_rtc_engine_batch_seconds_count", priority=priority)


def requests_served(values: Metrics) -> float:
    """Engine calls a node made for ``/v1/audio/transcriptions``, whatever their queue."""
    return sum(engine_calls(values, p) for p in ("final", "file", "interim"))


def aborted_by_client(values: Metrics) -> float:
    return sum(
        metric(values, "voxtral_rtc_errors_total", source="http", code=c) for c in CLIENT_LEFT
    )


def child_processes(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


async def gateway_and_nodes(
    servers: ServerProcesses, nodes: int = 1, **remote: Any
) -> tuple[Any, list[Any]]:
    """``nodes`` engine nodes and a gateway sending to them, all ready."""
    started = [await servers.start(f"node-{i}", node_config(free_port())) for i in range(nodes)]
    gateway = await servers.start(
        "gateway", gateway_config(free_port(), [n.v1 for n in started], **remote)
    )
    return gateway, started


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
    server_processes: ServerProcesses, beckett_audio: npt.NDArray[np.float32]
) -> None:
    gateway, (node,) = await gateway_and_nodes(server_processes)
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
    # The node did the decoding: six finals and the interims, each one request, queued as
    # the gateway said (this node trusts its callers: server.priority_hints any).
    served = await metrics(node.url)
    assert requests_served(served) - before >= 6
    assert engine_calls(served, "final") >= 6 and engine_calls(served, "interim") >= 1
    assert engine_calls(served, "file") == 0
    # The gateway's WAVs were read in the node's process: no decoder child was ever started.
    assert child_processes(node.proc.pid) == []
    gw = await metrics(gateway.url)
    assert metric(gw, "voxtral_rtc_engine_finals_total", outcome="completed") == 6
    assert metric(gw, "voxtral_rtc_engine_degraded") == 0


async def test_node_killed_mid_call_then_restarted(
    server_processes: ServerProcesses, beckett_audio: npt.NDArray[np.float32]
) -> None:
    gateway, (node,) = await gateway_and_nodes(server_processes)
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

    node_port = int(node.url.rsplit(":", 1)[1])
    await server_processes.start("node-again", node_config(node_port))
    await wait_readyz(gateway.url, "ready", timeout=15)
    assert metric(await metrics(gateway.url), "voxtral_rtc_engine_degraded") == 0
    async with call(gateway.url, beckett_audio) as client:
        await finished_items(client, 6)
        assert phrases(client) == BECKETT_PHRASES
        assert not client.of_type(FAILED)
    assert gateway.alive


async def test_a_stalled_node_fails_items_with_engine_timeout(
    server_processes: ServerProcesses, beckett_audio: npt.NDArray[np.float32]
) -> None:
    gateway, (node,) = await gateway_and_nodes(server_processes, timeout_s=1.5)
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
    server_processes: ServerProcesses, beckett_audio: npt.NDArray[np.float32]
) -> None:
    gateway, (first, second) = await gateway_and_nodes(server_processes, nodes=2)
    async with call(gateway.url, beckett_audio) as client:
        # Both take requests: the load is shared, not stacked on the first. How many
        # requests the first phrases make (interims or not) depends on the machine's speed,
        # so wait for both to have served one, by the third phrase at the latest, which
        # leaves three for the second node alone.
        for _ in range(3):
            await client.next_event(COMPLETED, timeout=30)
            served = [requests_served(await metrics(n.url)) for n in (first, second)]
            if min(served) >= 1:
                break
        assert min(served) >= 1, f"requests served by the two nodes: {served}"
        first.proc.kill()
        await first.proc.wait()
        await finished_items(client, 6)
        assert phrases(client) == BECKETT_PHRASES
        assert not client.of_type(FAILED)
    status, body = await readyz(gateway.url)
    assert (status, body["status"]) == (200, "ready")  # one server left is enough

    # A dead one from the start is skipped: the gateway starts ready and serves.
    gateway2 = await server_processes.start(
        "gateway2", gateway_config(free_port(), [first.v1, second.v1])
    )
    assert (await readyz(gateway2.url))[0] == 200
    async with call(gateway2.url, beckett_audio[: int(16000 * 3.2)]) as client:
        await finished_items(client, 2)
        assert phrases(client) == BECKETT_PHRASES[:2]


async def test_a_withdrawn_speculative_decode_aborts_its_request_on_the_node(
    server_processes: ServerProcesses, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """The gateway waits 1.5 s of silence before ending a turn, so beckett's 0.7 s gaps are
    pauses: each starts a speculative final that the next phrase withdraws. The node is
    stopped (SIGSTOP) across the first gap, so that decode is still in flight when speech
    resumes; the gateway must abort it, and the node, let go, sees its client gone."""
    node = await server_processes.start("node", node_config(free_port()))
    config = gateway_config(free_port(), [node.v1], timeout_s=30)
    config["engine"]["interim_interval_ms"] = 0  # no interims: only speculations go out
    config["segmenter"] = {"min_silence_ms": 1500}
    gateway = await server_processes.start("gateway", config)
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

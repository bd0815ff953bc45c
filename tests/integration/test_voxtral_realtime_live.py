"""A streaming engine behind every route: the tiny random Voxtral Realtime, loaded by the
server itself (``engine.kind: voxtral_realtime``).

Its text is random: these tests check the events and their order, not the words. Each
item's deltas come straight from the stream (no interims), its ``completed`` once the stream
has decoded past its end; a WebSocket session the engine has no room for gets an ``error``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

from agent.engines.voxtral_realtime_fixture import build_tiny_voxtral_realtime  # noqa: E402
from signaling.app import RunningServer, start_server  # noqa: E402
from tests.conftest import BECKETT, make_config  # noqa: E402
from tests.integration.test_realtime_ws import (  # noqa: E402
    TOKEN,
    encode,
    open_socket,
)
from tests.integration.test_robustness import error_of, offer_body  # noqa: E402
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient  # noqa: E402

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
ITEM_EVENTS = (
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    DELTA,
    COMPLETED,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral_realtime(tmp_path_factory.mktemp("voxtral-rt"))


@pytest.fixture
async def server(tiny: Path) -> AsyncIterator[RunningServer]:
    config = make_config(
        ENGINE__KIND="voxtral_realtime",
        ENGINE__MODEL=str(tiny),
        ENGINE__DEVICE="cpu",
        ENGINE__MAX_STREAMS="2",
        SERVER__AUTH_TOKENS=TOKEN,
    )
    running = await start_server(config)  # the server's own engine loading code
    try:
        yield running
    finally:
        await running.stop()


def assert_well_ordered(received: list[dict[str, Any]], items: int) -> None:
    """Per item: started, stopped, committed, then completed; deltas only between started
    and completed, their concatenation the transcript; items in turn."""
    completed = [e for e in received if e["type"] == COMPLETED]
    assert len(completed) >= items
    finished: set[str] = set()
    order = [e["item_id"] for e in completed]
    for item_id in order:
        mine = [e for e in received if e.get("item_id") == item_id and e["type"] in ITEM_EVENTS]
        kinds = [e["type"] for e in mine if e["type"] != DELTA]
        assert kinds == [t for t in ITEM_EVENTS if t != DELTA], kinds
        deltas = [e["delta"] for e in mine if e["type"] == DELTA]
        assert "".join(deltas).strip() == mine[-1]["transcript"]
        first = next(i for i, e in enumerate(mine) if e["type"] == ITEM_EVENTS[0])
        assert all(i > first for i, e in enumerate(mine) if e["type"] == DELTA)
        assert mine[-1]["type"] == COMPLETED
        assert mine[-1]["timings"]["delay_ms"] == 480
    for event in received:
        if event["type"] == DELTA and event["item_id"] in order:
            earlier = order[: order.index(event["item_id"])]
            assert set(earlier) <= finished, (event, finished)
        elif event["type"] == COMPLETED:
            finished.add(event["item_id"])
    assert any(e["type"] == DELTA for e in received)  # random text, but text


async def test_live_webrtc_call(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    assert server.state.worker is not None
    assert server.state.worker.engine.name == "voxtral_realtime"
    async with RealtimeClient(server.url, token=TOKEN) as client:
        await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 3.2)]))
        done = 0
        while done < 2:
            ev = await client.next_event(timeout=60)
            done += ev.type == COMPLETED
            assert ev.type != "error" and not ev.type.endswith(".failed"), ev.event
        received = [r.event for r in client.received]
    assert received[0]["type"] == "session.created"
    assert received[0]["session"]["audio"]["input"]["transcription"]["delay_ms"] == 480
    assert not [e for e in received if e["type"].endswith(".interim")]
    assert_well_ordered(received, 2)


async def test_realtime_websocket_session_and_a_refused_one(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.wait("session.created")
        await sock.send(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"transcription": {"delay_ms": 480}}}},
            }
        )
        await sock.wait("session.updated")
        await sock.send(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"transcription": {"delay_ms": 100}}}},
            }
        )
        (bad,) = await sock.wait("error")
        assert bad["error"]["code"] == "invalid_value"
        # The engine holds 2 streams: a second session fits, a third is refused.
        second = await open_socket(http, server)
        await second.wait("session.created")
        third = await open_socket(http, server)
        (refused,) = await third.wait("error")
        assert refused["error"]["code"] == "too_many_calls"
        await asyncio.wait_for(third._reader, 10)  # and the server ends that session
        # A WebRTC offer is refused before its call starts.
        pc, body = await offer_body()
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(f"{server.url}/api/offer", json=body, headers=headers) as resp:
                assert resp.status == 503
                assert (await error_of(resp))["code"] == "too_many_calls"
        finally:
            await pc.close()
        await second.close()
        await sock.stream(
            encode(beckett_audio[: int(16000 * 3.2)], "pcm16") + bytes(48_000 * 2),
            48_000,
            speed=2.0,
        )
        await sock.wait(COMPLETED, 2, timeout=60)
        await sock.close()
        received = [e for e in sock.received if e["type"] != "error"]
    assert_well_ordered(received, 2)


async def test_file_transcription(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("file", BECKETT.read_bytes(), filename="beckett.wav")
        form.add_field("response_format", "verbose_json")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(
            f"{server.url}/v1/audio/transcriptions", data=form, headers=headers
        ) as resp:
            body = await resp.json()
            assert resp.status == 200, body
    assert isinstance(body["text"], str) and body["text"]
    assert body["segments"] and body["duration"] == pytest.approx(9.96, abs=0.05)


async def test_client_driven_commits(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """Turn detection off, as Pipecat runs it: the client's commit makes the item, which
    takes the text of its audio decoded so far and completes once the stream has heard the
    delay past its end (the client's microphone goes on sending, here silence)."""
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.wait("session.created")
        await sock.send({"type": "session.update", "session": {"turn_detection": None}})
        await sock.wait("session.updated")
        await sock.stream(encode(beckett_audio[: int(16000 * 2.5)], "pcm16"), 48_000, speed=2.0)
        await sock.send({"type": "input_audio_buffer.commit"})
        await sock.stream(bytes(48_000), 48_000, speed=2.0)  # 1 s more: past the delay
        (completed,) = await sock.wait(COMPLETED, 1, timeout=60)
        assert len(sock.of_type("input_audio_buffer.committed")) == 1  # the session goes on
        await sock.close()
    item = completed["item_id"]
    deltas = [e["delta"] for e in sock.received if e["type"] == DELTA and e["item_id"] == item]
    assert completed["transcript"] and "".join(deltas).strip() == completed["transcript"]
    assert not sock.of_type("input_audio_buffer.speech_started")

"""The phone route with the streaming engine: a simulated Twilio Media Stream (8 kHz mu-law,
signed as Twilio signs it) served by the tiny random Voxtral Realtime, loaded by the server
itself (``engine.kind: voxtral_realtime``). Everything on 127.0.0.1.

The model's text is random: the tests check the events and their order, not the words.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

from agent.engines.voxtral_realtime import VoxtralRealtimeEngine  # noqa: E402
from agent.engines.voxtral_realtime_fixture import build_tiny_voxtral_realtime  # noqa: E402
from signaling.app import RunningServer, start_server  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.integration.test_robustness import wait_for  # noqa: E402
from tests.integration.test_voxtral_realtime_live import (  # noqa: E402
    COMPLETED,
    DELTA,
    assert_well_ordered,
)
from tests.integration.twilio_support import (  # noqa: E402
    AUTH_TOKEN,
    MEDIA_PATH,
    TOKEN,
    WebhookReceiver,
    closed,
    open_stream,
    subscribe,
    ws_url,
)
from tests.support.twilio_simulator import mulaw_8k, sign, silence  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core machines: torch's pool would fight the server's threads
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral_realtime(tmp_path_factory.mktemp("voxtral-rt-twilio"))


@pytest.fixture
async def hook() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
async def server(tiny: Path, hook: WebhookReceiver) -> AsyncIterator[RunningServer]:
    config = make_config(
        ENGINE__KIND="voxtral_realtime",
        ENGINE__MODEL=str(tiny),
        ENGINE__DEVICE="cpu",
        ENGINE__MAX_STREAMS="2",
        SERVER__AUTH_TOKENS=TOKEN,
        TELEPHONY__TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TELEPHONY__WEBHOOK_URL=hook.url,
    )
    running = await start_server(config)  # the server's own engine loading code
    try:
        yield running
    finally:
        await running.stop()


def engine_of(server: RunningServer) -> VoxtralRealtimeEngine:
    assert server.state.worker is not None
    engine = server.state.worker.engine
    assert isinstance(engine, VoxtralRealtimeEngine)
    return engine


async def test_a_phone_call_gets_well_ordered_streaming_events(
    server: RunningServer, hook: WebhookReceiver, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """Two phrases over a signed ``<Connect><Stream>``, in real time, then Twilio's ``stop``:
    the subscriber gets, per item, started, stopped, committed, deltas straight from the
    stream (no interims), then one ``completed`` whose transcript is its deltas; every event
    names the call and its track; the webhook gets each ``completed`` once."""
    engine = engine_of(server)
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server, auth_token=AUTH_TOKEN)
        await stream.begin()
        await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
        sub = await subscribe(http, server, stream.call_sid)
        await sub.wait("session.created")
        audio = mulaw_8k(beckett_audio[: int(16000 * 3.2)]) + silence(1.5)
        await stream.play({"inbound": audio})
        await stream.stop()
        assert await closed(stream) == (1000, "")  # and the server never wrote to Twilio
        await asyncio.wait_for(sub._reader, 30)  # closed once the call's items are done
    received = sub.received
    created = received[0]
    assert created["type"] == "session.created"
    assert created["session"]["audio"]["input"]["transcription"]["delay_ms"] == 480
    assert not [e for e in received if e["type"].endswith((".interim", ".failed"))]
    assert not [e for e in received if e["type"] == "error"]
    assert_well_ordered(received, 2)
    assert {(e.get("call_sid"), e.get("track")) for e in received} == {(stream.call_sid, "inbound")}
    completed = [e for e in received if e["type"] == COMPLETED]
    deltas = [e for e in received if e["type"] == DELTA]
    # No text outside an item: every delta belongs to an item that completed.
    assert {e["item_id"] for e in deltas} <= {e["item_id"] for e in completed}
    posted = await hook.wait(len(completed))
    await asyncio.sleep(0.5)  # a duplicate POST would have come by now
    assert [e["item_id"] for e in hook.received] == [e["item_id"] for e in completed]
    assert [e["transcript"] for e in posted] == [e["transcript"] for e in completed]
    await wait_for(lambda: not server.state.twilio_streams and not server.state.hubs, 5)
    await wait_for(lambda: engine.open_streams == 0, 5)


async def test_a_stream_the_engine_has_no_room_for_is_refused_at_the_upgrade(
    server: RunningServer,
) -> None:
    """The engine holds 2 streams: with two calls streaming, a third stream's upgrade gets
    ``503 too_many_calls`` (Twilio then ends the ``<Stream>``); once one ends, it fits."""
    async with aiohttp.ClientSession() as http:
        calls = []
        for _ in range(2):
            stream = await open_stream(http, server, auth_token=AUTH_TOKEN)
            await stream.begin()
            calls.append(stream)
        engine = engine_of(server)
        await wait_for(lambda: engine.open_streams == 2, 10)
        url = f"wss://{server.host}:{server.port}{MEDIA_PATH}"
        headers = {"X-Twilio-Signature": sign(AUTH_TOKEN, url)}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url(server, MEDIA_PATH), headers=headers)
        assert refused.value.status == 503
        await calls[0].stop()
        assert await closed(calls[0]) == (1000, "")
        await wait_for(lambda: engine.open_streams == 1, 10)
        again = await open_stream(http, server, auth_token=AUTH_TOKEN)
        await again.begin()
        await wait_for(lambda: engine.open_streams == 2, 10)
        for stream in (calls[1], again):
            await stream.stop()
            assert await closed(stream) == (1000, "")

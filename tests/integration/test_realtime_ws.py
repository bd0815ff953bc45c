"""``/v1/realtime``: the OpenAI Realtime transcription WebSocket, spoken to with a plain
aiohttp client exactly as the protocol says (the real SDKs are in test_realtime_clients).

The real server and the embedded engine on 127.0.0.1; beckett.wav in every input format.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import av
import numpy as np
import numpy.typing as npt
import pytest

from agent.engines.base import Engine, EngineRequest, EngineResult
from signaling.app import RunningServer
from tests.conftest import BECKETT_PHRASES, make_config, normalise
from tests.integration.server_process import Servers
from tests.integration.test_robustness import Echo, scrape, wait_for
from tests.support.engine_gate import CountingEngine
from tests.support.wire import problems
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
COMMITTED = "input_audio_buffer.committed"
TOKEN = "test-token-0123456789abcdef"


def resample(samples: npt.NDArray[np.float32], rate: int) -> npt.NDArray[np.float32]:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = 16_000
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    parts = [
        f.to_ndarray().reshape(-1) for f in [*resampler.resample(frame), *resampler.resample(None)]
    ]
    return np.concatenate(parts).astype(np.float32)


def encode(samples16k: npt.NDArray[np.float32], codec: str) -> bytes:
    """beckett as a client would send it: pcm16 at 24 kHz, or G.711 at 8 kHz (PyAV's own
    encoders, so our tables are checked against FFmpeg's)."""
    if codec == "pcm16":
        pcm = np.clip(resample(samples16k, 24_000) * 32768, -32768, 32767).astype("<i2")
        return pcm.tobytes()
    s16 = np.clip(resample(samples16k, 8_000) * 32768, -32768, 32767).astype("<i2")
    ctx = av.CodecContext.create({"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[codec], "w")
    ctx.sample_rate, ctx.format, ctx.layout = 8000, "s16", "mono"
    frame = av.AudioFrame.from_ndarray(s16.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


class Socket:
    """A raw client: what it sent, what it got."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.received.append(json.loads(msg.data))
                self._new.set()

    def send(self, event: dict[str, Any]) -> Any:
        return self.ws.send_str(json.dumps(event))

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.received if e["type"] == type_]

    async def wait(self, type_: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.of_type(type_)) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self._reader.done():
                raise AssertionError(f"{count} x {type_} not received: {self.types()}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return self.of_type(type_)

    def types(self) -> list[str]:
        return [e["type"] for e in self.received]

    async def stream(self, data: bytes, bytes_per_s: int, speed: float = 1.0) -> None:
        """Appends of 50 ms, paced at ``speed`` times real time (as LiveKit sends them),
        until all is sent or the server closes the socket."""
        step = bytes_per_s // 20
        started = time.monotonic()
        for i in range(0, len(data), step):
            chunk = base64.b64encode(data[i : i + step]).decode()
            if self.ws.closed:
                return
            try:
                await self.send({"type": "input_audio_buffer.append", "audio": chunk})
            except ConnectionResetError:
                return
            due = started + (i + step) / bytes_per_s / speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


def url(server: RunningServer, query: str = "?intent=transcription") -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime" + query


async def open_socket(
    http: aiohttp.ClientSession, server: RunningServer, query: str = "?intent=transcription"
) -> Socket:
    ws = await http.ws_connect(url(server, query), headers={"Authorization": f"Bearer {TOKEN}"})
    return Socket(ws)


@pytest.fixture
async def server(servers: Servers, embedded_engine: Engine) -> RunningServer:
    return await servers.start(make_config(SERVER__AUTH_TOKENS=TOKEN), embedded_engine)


@pytest.fixture
async def echo_ws_server(servers: Servers) -> RunningServer:
    return await servers.start(make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN), Echo())


def assert_phrases(completed: Sequence[dict[str, Any]]) -> None:
    heard = [normalise(e["transcript"]).replace("bail", "fail") for e in completed]
    assert heard == BECKETT_PHRASES, heard


# -- the session as the clients use it -------------------------------------------------------


async def test_ga_session_streams_beckett_in_real_time(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server, "?intent=transcription&model=gpt-4o-transcribe")
        created = (await sock.wait("session.created"))[0]
        assert created["session"]["type"] == "transcription"
        assert created["session"]["audio"]["input"]["format"] == {
            "type": "audio/pcm",
            "rate": 24000,
        }
        await sock.send(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": 24000},
                            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                            "turn_detection": {
                                "type": "server_vad",
                                "threshold": 0.5,
                                "prefix_padding_ms": 300,
                                "silence_duration_ms": 500,
                            },
                            "noise_reduction": {"type": "near_field"},
                        }
                    },
                    "include": ["item.input_audio_transcription.logprobs"],
                },
            }
        )
        updated = (await sock.wait("session.updated"))[0]
        assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
        await sock.stream(encode(beckett_audio, "pcm16") + bytes(48_000 * 3), 48_000)
        completed = await sock.wait(COMPLETED, 6, timeout=60)
        assert_phrases(completed)
        for event in completed:
            assert event["usage"]["type"] == "duration" and 0.3 < event["usage"]["seconds"] < 3
        assert len(sock.of_type("input_audio_buffer.speech_started")) == 6
        assert len(sock.of_type("input_audio_buffer.committed")) == 6
        assert not sock.of_type("error")
        # Everything the server really sent is what the event types say.
        assert [p for e in sock.received for p in problems(e)] == []
        # Each item's completed leaves before any delta of the next (LiveKit keeps one string).
        seen_done: set[str] = set()
        order = [e["item_id"] for e in completed]
        for event in sock.received:
            if event["type"] == DELTA:
                earlier = order[: order.index(event["item_id"])]
                assert set(earlier) <= seen_done, (event, seen_done)
            elif event["type"] == COMPLETED:
                seen_done.add(event["item_id"])
        await sock.close()
    await wait_for(lambda: not server.state.sockets, 5)


@pytest.mark.parametrize("fmt", ["g711_ulaw", "g711_alaw"])
async def test_beta_session_with_g711(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32], fmt: str
) -> None:
    codec = {"g711_ulaw": "pcmu", "g711_alaw": "pcma"}[fmt]
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.wait("session.created")
        await sock.send(
            {
                "type": "transcription_session.update",
                "session": {
                    "input_audio_format": fmt,
                    "input_audio_transcription": {"model": "whisper-1"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                },
            }
        )
        updated = (await sock.wait("transcription_session.updated"))[0]
        assert updated["session"]["input_audio_format"] == fmt
        await sock.stream(encode(beckett_audio, codec) + bytes(8000 * 2), 8000, speed=4)
        assert_phrases(await sock.wait(COMPLETED, 6, timeout=60))
        await sock.close()


async def test_client_commits_with_turn_detection_off(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """Pipecat's default: ``turn_detection: null``, a commit when its own VAD hears the end."""
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.send(
            {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}
        )
        updated = (await sock.wait("session.updated"))[0]
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        first_two = beckett_audio[: int(16000 * 3.2)]
        await sock.stream(encode(first_two, "pcm16"), 48_000, speed=8)
        await asyncio.sleep(0.5)
        assert not sock.of_type(COMPLETED)  # no server VAD: nothing is cut
        await sock.send({"type": "input_audio_buffer.commit"})
        done = await sock.wait(COMPLETED, timeout=30)
        assert normalise(done[0]["transcript"]) == "ever tried ever failed"
        await sock.close()


@pytest.mark.parametrize(
    ("model", "server_vad"),
    [
        ("gpt-realtime-whisper", False),
        ("gpt-live-transcribe-1", False),
        ("gpt-4o-transcribe", True),
    ],
)
async def test_models_that_commit_client_side_turn_server_vad_off(
    echo_ws_server: RunningServer, model: str, server_vad: bool
) -> None:
    """As OpenAI's sessions for these models: no server VAD unless the update asks for it
    (LiveKit's plugin then commits each turn on its own VAD)."""
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, echo_ws_server)
        session = {"type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}
        await sock.send({"type": "session.update", "session": session})
        updated = (await sock.wait("session.updated"))[0]
        turn = updated["session"]["audio"]["input"]["turn_detection"]
        assert (turn is not None) == server_vad, turn
        await sock.close()


class Recording(Engine):
    """Echo, noting each request's prompt."""

    name = "recording"

    def __init__(self) -> None:
        self.prompts: list[str | None] = []

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        time.sleep(0.05)
        self.prompts.extend(r.prompt for r in batch)
        return [EngineResult("ok") for _ in batch]


async def test_client_events_are_handled_in_arrival_order(
    servers: Servers,
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    """A ``session.update`` sent right after a ``commit`` does not change that commit's
    decode, and audio appended after the update is not in it."""
    engine = Recording()
    config = make_config(
        SERVER__AUTH_TOKENS=TOKEN,
        ENGINE__INTERIM_INTERVAL_MS="0",
        ENGINE__SPECULATIVE_FINAL="false",
    )
    server = await servers.start(config, engine)
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.send({"type": "session.update", "session": {"turn_detection": None}})
        audio = encode(beckett_audio[: int(16000 * 1.5)], "pcm16")
        # Everything in one burst: the server sees it all queued at once.
        for i in range(0, len(audio), 4800):
            chunk = base64.b64encode(audio[i : i + 4800]).decode()
            await sock.send({"type": "input_audio_buffer.append", "audio": chunk})
        await sock.send({"type": "input_audio_buffer.commit"})
        update = {"input_audio_transcription": {"prompt": "after"}}
        await sock.send({"type": "session.update", "session": update})
        await sock.send({"type": "input_audio_buffer.commit"})
        await sock.wait(COMPLETED, timeout=10)
        await sock.wait("error", timeout=10)  # the second commit: nothing after the first
        assert engine.prompts == [None]
        assert sock.of_type("error")[0]["error"]["code"] == "input_audio_buffer_commit_empty"
        await sock.close()


# -- bad input --------------------------------------------------------------------------------


async def test_protocol_mistakes_get_an_error_and_the_session_goes_on(
    echo_ws_server: RunningServer,
) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, echo_ws_server)
        await sock.wait("session.created")
        await sock.ws.send_str("this is not json")
        await sock.send({"type": "response.create"})
        await sock.send({"type": "input_audio_buffer.append", "audio": "@@not base64@@"})
        await sock.send({"type": "session.update", "session": {"input_audio_format": "opus"}})
        bad_rate = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}
        await sock.send({"type": "session.update", "session": bad_rate})
        await sock.ws.send_bytes(b"\x00\x01")
        errors = await sock.wait("error", 6, timeout=10)
        codes = [e["error"]["code"] for e in errors]
        assert codes == [
            "invalid_json",
            "unknown_event_type",
            "invalid_value",
            "invalid_value",
            "invalid_value",
            "invalid_request_error",
        ], codes
        # Still alive, and the refused updates changed nothing.
        await sock.send({"type": "session.update", "session": {"include_interim": True}})
        updated = (await sock.wait("session.updated"))[0]
        assert updated["session"]["audio"]["input"]["format"]["type"] == "audio/pcm"
        await sock.close()


async def test_an_oversize_message_closes_with_1009(servers: Servers) -> None:
    config = make_config(SERVER__AUTH_TOKENS=TOKEN, LIMITS__WS_MAX_MESSAGE_BYTES="65536")
    server = await servers.start(config, Echo())
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.wait("session.created")
        big = base64.b64encode(bytes(60_000)).decode()
        await sock.send({"type": "input_audio_buffer.append", "audio": big})
        await asyncio.wait_for(sock._reader, 5)
        assert sock.ws.close_code == 1009
    await wait_for(lambda: not server.state.sockets, 5)


async def test_a_flood_faster_than_real_time(
    servers: Servers, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """Ten seconds at once fit the input buffer and are transcribed; a minute at once does
    not: an ``error`` and a close, the server's memory bounded by the buffer."""
    engine = CountingEngine(Echo(0.02))
    config = make_config(
        VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN, LIMITS__INPUT_BUFFER_BYTES="2000000"
    )
    server = await servers.start(config, engine)
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        pcm = encode(beckett_audio, "pcm16")
        await sock.stream(pcm + bytes(48_000), 48_000, speed=1000)
        await sock.wait(COMPLETED, 6, timeout=30)  # the energy VAD cuts beckett 6 or 7 ways
        await wait_for(lambda: len(sock.of_type(COMPLETED)) == len(sock.of_type(COMMITTED)), 10)
        assert not sock.of_type("error")  # all of it transcribed, nothing refused
        await sock.close()

        sock = await open_socket(http, server)
        for _ in range(6):
            await sock.stream(pcm, 48_000, speed=10**6)
        await asyncio.wait_for(sock._reader, 15)
        errors = sock.of_type("error")
        assert errors and errors[-1]["error"]["code"] == "input_buffer_full", sock.types()
        assert sock.ws.close_code == 1008
    await wait_for(lambda: not server.state.sockets, 5)


async def test_a_client_that_vanishes_mid_utterance_is_flushed_and_released(
    echo_ws_server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, echo_ws_server)
        await sock.stream(encode(beckett_audio[: int(16000 * 0.9)], "pcm16"), 48_000, speed=4)
        await sock.wait("input_audio_buffer.speech_started", timeout=5)
        [socket] = echo_ws_server.state.sockets.values()
        transport = sock.ws._response.connection.transport  # type: ignore[union-attr]
        transport.abort()  # no close frame: the TCP connection just drops
    await wait_for(lambda: not echo_ws_server.state.sockets, 10)
    assert socket.session.utterances == 1  # the open phrase went to the engine
    assert socket.session.closed
    assert all(t.done() for t in socket.session._tasks)
    assert echo_ws_server.state.worker is not None
    await wait_for(lambda: echo_ws_server.state.worker.completed >= 1, 5)  # type: ignore[union-attr]


async def test_append_after_the_server_closed(echo_ws_server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, echo_ws_server)
        await sock.wait("session.created")
        [socket] = echo_ws_server.state.sockets.values()
        await socket.close("closed")
        await asyncio.wait_for(sock._reader, 5)
        with pytest.raises(ConnectionResetError):
            await sock.send({"type": "input_audio_buffer.append", "audio": ""})
    assert not echo_ws_server.state.sockets
    assert await healthy(echo_ws_server)


async def healthy(server: RunningServer) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/healthz") as resp:
        return resp.status == 200


@pytest.mark.parametrize(
    ("headers", "protocols", "status"),
    [
        ({}, (), 401),
        ({"Authorization": "Bearer wrong"}, (), 401),
        ({}, ("realtime", "openai-insecure-api-key.wrong"), 401),
        ({"Authorization": f"Bearer {TOKEN}", "Origin": "https://evil.example"}, (), 403),
    ],
    ids=["no-token", "wrong-token", "wrong-subprotocol-token", "foreign-origin"],
)
async def test_refused_at_the_upgrade(
    echo_ws_server: RunningServer, headers: dict[str, str], protocols: tuple[str, ...], status: int
) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url(echo_ws_server), headers=headers, protocols=protocols)
        assert refused.value.status == status
    assert not echo_ws_server.state.sockets


async def test_a_browser_token_subprotocol_is_accepted(echo_ws_server: RunningServer) -> None:
    protocols = ("realtime", f"openai-insecure-api-key.{TOKEN}", "openai-beta.realtime-v1")
    async with aiohttp.ClientSession() as http:
        origin = {"Origin": echo_ws_server.url}  # the server's own page
        ws = await http.ws_connect(url(echo_ws_server), protocols=protocols, headers=origin)
        assert ws.protocol == "realtime"
        sock = Socket(ws)
        await sock.wait("session.created")
        await sock.close()


async def test_sessions_count_against_max_calls(servers: Servers) -> None:
    """A burst of upgrades: exactly ``limits.max_calls`` get in, the rest 503."""
    config = make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN, LIMITS__MAX_CALLS="3")
    server = await servers.start(config, Echo())
    async with aiohttp.ClientSession() as http:
        attempts = await asyncio.gather(
            *(open_socket(http, server) for _ in range(8)), return_exceptions=True
        )
        opened = [a for a in attempts if isinstance(a, Socket)]
        refused = [a for a in attempts if isinstance(a, aiohttp.WSServerHandshakeError)]
        assert len(opened) == 3 and len(refused) == 5, attempts
        assert all(r.status == 503 for r in refused)
        assert len(server.state.sockets) == 3
        for sock in opened:
            await sock.close()
    await wait_for(lambda: not server.state.sockets, 5)


async def test_sockets_and_webrtc_calls_share_max_calls(servers: Servers) -> None:
    config = make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN, LIMITS__MAX_CALLS="2")
    server = await servers.start(config, Echo())
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        async with RealtimeClient(server.url, token=TOKEN) as client:
            await client.connect(ArrayAudioTrack(np.zeros(16000 * 5, np.float32)))
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await open_socket(http, server)
            assert refused.value.status == 503
            assert server.state.live_sessions == 2
            async with http.get(f"{server.url}/healthz") as resp:
                assert (await resp.json())["calls"] == 2
        await sock.close()
    await wait_for(lambda: server.state.live_sessions == 0, 10)


async def test_metrics_count_socket_sessions(echo_ws_server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, echo_ws_server)
        await sock.wait("session.created")
        await sock.ws.send_str("not json")
        await sock.wait("error")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(f"{echo_ws_server.url}/metrics", headers=auth) as resp:
            live = await resp.text()
        await sock.close()
        await wait_for(lambda: not echo_ws_server.state.sockets, 5)
        async with http.get(f"{echo_ws_server.url}/metrics", headers=auth) as resp:
            after = await resp.text()
    assert scrape(live)[("voxtral_rtc_calls_active", ())] == 1
    counts = scrape(after)
    assert counts[("voxtral_rtc_calls_started_total", ())] == 1
    assert (
        counts[("voxtral_rtc_errors_total", (("code", "invalid_json"), ("source", "protocol")))]
        == 1
    )
    ended = {k: v for k, v in counts.items() if k[0] == "voxtral_rtc_calls_ended_total"}
    assert ended == {("voxtral_rtc_calls_ended_total", (("reason", "client_closed"),)): 1}, ended


async def test_clear_drops_the_open_utterance(
    echo_ws_server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, echo_ws_server)
        await sock.stream(encode(beckett_audio[: int(16000 * 1.0)], "pcm16"), 48_000, speed=4)
        await sock.wait("input_audio_buffer.speech_started", timeout=5)
        await sock.send({"type": "input_audio_buffer.clear"})
        await sock.wait("input_audio_buffer.cleared", timeout=5)
        await sock.stream(bytes(48_000 * 2), 48_000, speed=4)  # silence that would end it
        await asyncio.sleep(0.3)
        assert not sock.of_type("input_audio_buffer.committed")
        assert not sock.of_type(COMPLETED)
        await sock.close()


async def test_a_silent_socket_times_out_and_is_released(servers: Servers) -> None:
    config = make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN, AUDIO__IDLE_TIMEOUT_S="1")
    server = await servers.start(config, Echo())
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        [socket] = server.state.sockets.values()
        await asyncio.wait_for(sock._reader, 5)  # the server closes it
        assert sock.ws.close_code == 1000
    await wait_for(lambda: not server.state.sockets, 5)
    assert socket.end_reason == "idle_timeout"


async def test_max_call_s_ends_the_session(
    servers: Servers, beckett_audio: npt.NDArray[np.float32]
) -> None:
    config = make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN, LIMITS__MAX_CALL_S="2")
    server = await servers.start(config, Echo())
    async with aiohttp.ClientSession() as http:
        sock = await open_socket(http, server)
        await sock.stream(encode(beckett_audio[: 16000 * 3], "pcm16"), 48_000)
        await asyncio.wait_for(sock._reader, 10)
        errors = sock.of_type("error")
        assert errors and errors[-1]["error"]["code"] == "session_expired"
        assert sock.of_type(COMPLETED)  # the open utterance was flushed first
    await wait_for(lambda: not server.state.sockets, 5)

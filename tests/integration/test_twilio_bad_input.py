"""A Twilio media stream's bad input, vanishing, idling and churn, on the real server (energy
VAD, an engine that answers at once) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

from signaling.app import RunningServer, start_server
from tests.conftest import make_config
from tests.integration.test_robustness import Echo, scrape, wait_for
from tests.integration.twilio_support import (
    COMPLETED,
    WebhookReceiver,
    closed,
    open_stream,
    subscribe,
)
from tests.support.twilio_simulator import MULAW_FORMAT, mulaw_8k, silence

ONE_PHRASE_S = 1.6  # "ever tried", then silence


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    config = make_config(VAD__KIND="energy", AUDIO__IDLE_TIMEOUT_S="1")
    running = await start_server(config, engine=Echo())
    try:
        yield running
    finally:
        await running.stop()


async def released(server: RunningServer) -> None:
    await wait_for(lambda: not server.state.twilio_streams and not server.state.hubs, 10)


async def test_not_json_before_start_is_refused(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server)
        await stream.ws.send_str("this is not json")
        code, reason = await closed(stream)
    assert (code, reason.split(":")[0]) == (1008, "invalid_json")
    await released(server)


async def test_media_before_start_is_refused(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server)
        await stream.connected()
        await stream.send(stream.media_message("inbound", 0, silence(0.02)))
        code, reason = await closed(stream)
    assert (code, reason.split(":")[0]) == (1008, "media_before_start")
    assert not server.state.hubs  # nothing started
    await released(server)


async def test_an_unsupported_media_format_is_refused_with_a_reason(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server)
        await stream.connected()
        linear = {**MULAW_FORMAT, "encoding": "audio/x-l16", "sampleRate": 16000}
        await stream.send(stream.start_message(linear))
        code, reason = await closed(stream)
    assert code == 1003
    assert reason.startswith("unsupported_media_format: audio/x-l16 16000 Hz"), reason
    assert not server.state.hubs
    await released(server)


async def test_no_start_in_time_is_refused() -> None:
    config = make_config(VAD__KIND="energy", TELEPHONY__START_TIMEOUT_S="0.5")
    server = await start_server(config, engine=Echo())
    try:
        async with aiohttp.ClientSession() as http:
            stream = await open_stream(http, server)
            await stream.connected()
            code, reason = await closed(stream)
        assert (code, reason.split(":")[0]) == (1008, "start_timeout")
        await released(server)
    finally:
        await server.stop()


async def test_after_start_bad_and_unknown_messages_are_skipped(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """Not JSON, a bad payload, a track that was not announced, an event type Twilio may add
    later, a ``mark`` and a ``dtmf``: counted or ignored, and the call goes on."""
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server)
        await stream.begin()
        await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
        sub = await subscribe(http, server, stream.call_sid)
        await stream.ws.send_str("{not json")
        await stream.send({"event": "media", "media": {"track": "inbound", "payload": "@@"}})
        await stream.send(stream.media_message("outbound", 0, silence(0.02)))
        await stream.send({"event": "transcript", "streamSid": stream.stream_sid})
        await stream.mark("greeting-done")
        await stream.dtmf("5")
        audio = mulaw_8k(beckett_audio[: int(16000 * ONE_PHRASE_S)])
        await stream.play({"inbound": audio}, speed=4)
        await stream.stop()
        assert await closed(stream) == (1000, "")
        await asyncio.wait_for(sub._reader, 5)
    assert len(sub.of_type(COMPLETED)) == 1
    [dtmf] = sub.of_type("voxtral.dtmf")
    assert (dtmf["digit"], dtmf["track"], dtmf["call_sid"]) == ("5", "inbound", stream.call_sid)
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
        counts = scrape(await resp.text())
    for code in ("invalid_json", "invalid_value", "unknown_track"):
        key = ("voxtral_rtc_errors_total", (("code", code), ("source", "protocol")))
        assert counts[key] == 1, code
    await released(server)


async def test_an_oversize_message_closes_with_1009_and_flushes(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server)
        await stream.begin()
        await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
        sub = await subscribe(http, server, stream.call_sid)
        await stream.play({"inbound": mulaw_8k(beckett_audio[: int(16000 * 0.9)])}, speed=4)
        await sub.wait("input_audio_buffer.speech_started", timeout=5)
        # 100 KB of mu-law in one message: far past what Twilio sends (160 bytes).
        await stream.send(stream.media_message("inbound", 900, silence(12.5)))
        code, _ = await closed(stream)
        assert code == 1009
        await asyncio.wait_for(sub._reader, 5)
    assert len(sub.of_type(COMPLETED)) == 1  # the open phrase was flushed
    await released(server)


async def test_a_stream_that_never_stops_is_flushed_and_released(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    """No ``stop``, no close: after ``audio.idle_timeout_s`` without a message the open
    phrase is flushed, its ``completed`` reaches the webhook, and the stream is released."""
    async with WebhookReceiver() as hook:
        config = make_config(
            VAD__KIND="energy", AUDIO__IDLE_TIMEOUT_S="1", TELEPHONY__WEBHOOK_URL=hook.url
        )
        server = await start_server(config, engine=Echo())
        try:
            async with aiohttp.ClientSession() as http:
                stream = await open_stream(http, server)
                await stream.begin()
                audio = mulaw_8k(beckett_audio[: int(16000 * 0.9)])  # mid-phrase
                await stream.play({"inbound": audio}, speed=4)
                code, _ = await closed(stream, timeout=5)
                assert code == 1000
            [posted] = await hook.wait(1)
            assert posted["call_sid"] == stream.call_sid
            await released(server)
            [session] = server.state.metrics.calls_ended.collect()[0].samples[:1]
            assert session.labels["reason"] == "idle_timeout"
        finally:
            await server.stop()


async def test_a_socket_dropped_mid_utterance_is_flushed(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    async with WebhookReceiver() as hook:
        config = make_config(VAD__KIND="energy", TELEPHONY__WEBHOOK_URL=hook.url)
        server = await start_server(config, engine=Echo())
        try:
            async with aiohttp.ClientSession() as http:
                stream = await open_stream(http, server)
                await stream.begin()
                await wait_for(lambda: server.state.twilio_streams, 5)
                [live] = server.state.twilio_streams.values()
                await wait_for(lambda: live.sessions, 5)
                await stream.play({"inbound": mulaw_8k(beckett_audio[: int(16000 * 0.9)])})
                await wait_for(lambda: live.sessions[0].heard_ms > 800, 5)
                transport = stream.ws._response.connection.transport  # type: ignore[union-attr]
                transport.abort()  # no close frame: the TCP connection just drops
            await released(server)
            [session] = live.sessions
            assert session.utterances == 1 and session.closed
            assert session.end_reason in ("client_gone", "client_closed", "client_error")
            assert all(t.done() for t in session._tasks)
            [posted] = await hook.wait(1)
            assert posted["transcript"].startswith("heard")
        finally:
            await server.stop()


async def test_audio_time_follows_twilios_timestamps(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """The first chunk is stamped 2 s into the stream and every chunk is sent twice: the
    speech starts 2 s later in audio time, and the repeats are not heard."""
    audio = mulaw_8k(beckett_audio[: int(16000 * ONE_PHRASE_S)])
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, server)
        await stream.begin()
        await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
        sub = await subscribe(http, server, stream.call_sid)
        for i in range(0, len(audio), 160):
            message = stream.media_message("inbound", 2000 + i // 8, audio[i : i + 160])
            await stream.send(message)
            await stream.send(message)  # a repeat: same chunk, same timestamp
            await asyncio.sleep(0.005)
        await stream.stop()
        await closed(stream)
        await asyncio.wait_for(sub._reader, 5)
    [started] = sub.of_type("input_audio_buffer.speech_started")
    [stopped] = sub.of_type("input_audio_buffer.speech_stopped")
    [done] = sub.of_type(COMPLETED)
    # The energy VAD finds "ever tried" 0.3-0.4 s into the file: 2.3-2.4 s into the call.
    assert 2250 <= started["audio_start_ms"] <= 2500, started
    # Heard once: the phrase lasts under a second, not twice that.
    assert stopped["audio_end_ms"] - started["audio_start_ms"] < 1200, (started, stopped)
    assert done["usage"]["seconds"] < 1.6, done


async def test_shutdown_flushes_open_calls() -> None:
    async with WebhookReceiver() as hook:
        config = make_config(VAD__KIND="energy", TELEPHONY__WEBHOOK_URL=hook.url)
        server = await start_server(config, engine=Echo())
        try:
            async with aiohttp.ClientSession() as http:
                stream = await open_stream(http, server)
                await stream.begin()
                # A tone the energy VAD takes for speech, and no end to it.
                tone = mulaw_8k(0.3 * np.sin(np.arange(16000) / 5).astype(np.float32))
                await stream.play({"inbound": tone}, speed=4)
                await server.state.drain(grace_s=5)
                code, _ = await closed(stream)
                assert code == 1001
            assert len(await hook.wait(1)) == 1  # the open utterance's completed went out
        finally:
            await server.stop()


async def test_churn_of_short_calls_leaves_nothing(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """100 short calls, eight at a time, a quarter of them dropped without a close: no
    stream, hub, session or task is left."""
    phrase = mulaw_8k(beckett_audio[: int(16000 * 0.6)])
    before = len(asyncio.all_tasks())
    slots = asyncio.Semaphore(8)

    async def call(n: int, http: aiohttp.ClientSession) -> None:
        async with slots:
            stream = await open_stream(http, server)
            await stream.begin()
            await stream.play({"inbound": phrase + silence(0.3)}, speed=20)
            if n % 4 == 0:
                stream.ws._response.connection.transport.abort()  # type: ignore[union-attr]
                return
            await stream.stop()
            await closed(stream)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(call(n, http) for n in range(100)))
    await released(server)
    for _ in range(20):
        await asyncio.sleep(0.05)
    gc.collect()
    assert server.state.live_sessions == 0
    assert len(asyncio.all_tasks()) <= before, asyncio.all_tasks()
    started = server.state.metrics.calls_started.collect()[0].samples[0].value
    assert started == 100

"""A peer that vanishes without closing is released within the idle timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from agent.engines.base import Engine
from signaling.app import start_server
from tests.conftest import make_config
from tests.integration.vanishing_client import start_talking


async def test_killed_client_is_released_and_its_speech_flushed(embedded_engine: Engine) -> None:
    server = await start_server(make_config(AUDIO__IDLE_TIMEOUT_S="2"), engine=embedded_engine)
    proc = await start_talking(server.url)
    try:
        assert len(server.state.calls) == 1
        session = next(iter(server.state.calls.values()))
        # Mid-phrase, the process dies: no close, no BYE, no end of track.
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        killed_at = time.perf_counter()
        while server.state.calls and time.perf_counter() - killed_at < 10:
            await asyncio.sleep(0.05)
        released_after = time.perf_counter() - killed_at
        assert not server.state.calls
        assert session.closed
        assert session.end_reason == "idle_timeout"
        # Idle timeout (2 s) + the engine time for the flushed utterance, with slack.
        assert released_after < 2 + 3, released_after
        assert session.utterances == 1  # the open phrase was flushed, not dropped
        assert server.state.worker is not None and server.state.worker.completed >= 1
        # No task of the session is left running.
        assert all(t.done() for t in session.session._tasks)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop()


async def test_call_that_never_sends_audio_is_released(embedded_engine: Engine) -> None:
    from voxtral_rtc_client import RealtimeClient

    server = await start_server(make_config(AUDIO__IDLE_TIMEOUT_S="1"), engine=embedded_engine)
    try:
        async with RealtimeClient(server.url) as client:
            await client.connect(None)  # an audio section, but never a frame of audio
            await asyncio.sleep(0)
            assert len(server.state.calls) == 1
            session = next(iter(server.state.calls.values()))
            await asyncio.wait_for(session.wait_closed(), 5)
            assert session.end_reason == "idle_timeout"
            assert session.utterances == 0
            assert not server.state.calls
    finally:
        await server.stop()

"""The remote engine against a scripted transcription server (a real aiohttp server on
127.0.0.1): a timeout on a server that still answers is load, not death; one that answers
nothing is probed and taken out; priorities go out as ``X-Voxtral-Priority`` and the
server's ``X-Voxtral-Capacity`` sets the engine's slots; an interim is not retried.

The real node (another voxtral-rtc) is in ``tests/integration/test_remote_engine.py``; here
the server's timing is the test's to decide, which a real engine's is not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import web

from agent.config import EngineConfig, RemoteEngineConfig
from agent.engines.base import EngineRequest, Priority
from agent.engines.remote import CAPACITY_HEADER, PRIORITY_HEADER, RemoteEngine
from agent.errors import EngineError

UTTERANCE = EngineRequest(np.zeros(16_000, np.float32))


@dataclass
class Script:
    """What the server does: requests with ``prompt`` "hold" wait until released; with
    ``stalled`` every request (probes too) waits; ``busy_interims`` answers 503 to them."""

    stalled: bool = False
    busy_interims: bool = False
    capacity: str = "3"
    release: asyncio.Event = field(default_factory=asyncio.Event)
    probes: int = 0
    priorities: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        hint = request.headers.get(PRIORITY_HEADER, "")
        headers = {CAPACITY_HEADER: self.capacity}
        if "prompt" not in form:
            self.probes += 1
        else:
            self.priorities.append(hint)
        if self.stalled or form.get("prompt") == "hold":
            await self.release.wait()
        if self.busy_interims and hint == "interim":
            return web.json_response({"error": {"code": "interim_skipped"}}, status=503)
        return web.json_response({"text": f"heard {form.get('prompt', '')}"}, headers=headers)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", script.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield script, f"http://127.0.0.1:{port}/v1"
    finally:
        script.release.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def engine_for(url: str, **remote: object) -> AsyncIterator[RemoteEngine]:
    """A started engine on ``url`` (0.3 s per utterance, no retries unless given); closed."""
    settings: dict[str, object] = {"base_url": (url,), "timeout_s": 0.3, "retries": 0, **remote}
    engine = RemoteEngine(EngineConfig(kind="remote", remote=RemoteEngineConfig(**settings)))  # type: ignore[arg-type]
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


def said(prompt: str) -> EngineRequest:
    return EngineRequest(UTTERANCE.audio, prompt=prompt)


async def test_timeouts_while_the_server_answers_others_never_take_it_out(
    server: tuple[Script, str],
) -> None:
    script, url = server
    async with engine_for(url) as engine:
        # More than FAILURE_THRESHOLD time out together, as in a node's long queue, while
        # the server answers another request.
        held = [
            asyncio.create_task(engine.transcribe_one(said("hold"), Priority.FINAL))
            for _ in range(5)
        ]
        result = await engine.transcribe_one(said("quick"), Priority.FINAL)
        assert result.text == "heard quick"
        for task in held:
            with pytest.raises(EngineError) as err:
                await task
            assert err.value.code == "engine_timeout"
        backend = engine.pool.backends[0]
        assert not engine.degraded and not backend.open and backend.failures == 0
        assert script.probes == 1  # the one at start: a busy server is not probed


async def test_a_timeout_with_no_answer_meanwhile_is_checked_by_a_probe(
    server: tuple[Script, str],
) -> None:
    script, url = server
    async with engine_for(url) as engine:
        for _ in range(4):
            with pytest.raises(EngineError) as err:
                await engine.transcribe_one(said("hold"), Priority.FINAL)
            assert err.value.code == "engine_timeout"
            while engine._probes:  # the check runs in the background
                await asyncio.sleep(0.01)
        # Each probe was answered: the server is alive, only slow for these requests.
        assert script.probes == 5 and not engine.degraded


async def test_a_server_that_answers_nothing_is_taken_out_and_probed_back(
    server: tuple[Script, str],
) -> None:
    script, url = server
    async with engine_for(url) as engine:
        script.stalled = True
        with pytest.raises(EngineError) as err:
            await engine.transcribe_one(said("x"), Priority.FINAL)
        assert err.value.code == "engine_timeout"
        for _ in range(100):
            if engine.degraded:
                break
            await asyncio.sleep(0.02)
        assert engine.degraded  # its probe timed out too
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(EngineError) as err:
            await engine.transcribe_one(said("x"), Priority.FINAL)
        assert err.value.code == "engine_unavailable" and loop.time() - t0 < 0.1
        script.stalled = False
        script.release.set()
        for _ in range(200):
            if not engine.degraded:
                break
            await asyncio.sleep(0.02)
        assert not engine.degraded
        assert (await engine.transcribe_one(said("back"), Priority.FINAL)).text == "heard back"


async def test_priority_goes_out_capacity_comes_back_and_interims_are_not_retried(
    server: tuple[Script, str],
) -> None:
    script, url = server
    async with engine_for(url, max_concurrency=8, retries=3) as engine:
        assert engine.slots == 3  # the start-up probe's answer said 3 (under the cap, 8)
        await engine.transcribe_one(said("a"), Priority.FINAL)
        await engine.transcribe_one(said("b"), Priority.INTERIM)
        assert script.priorities == ["final", "interim"]
        script.capacity = "20"
        await engine.transcribe_one(said("c"), Priority.FILE)
        assert engine.slots == 8 and script.priorities[-1] == "file"
        script.busy_interims = True
        script.priorities.clear()
        with pytest.raises(EngineError) as err:
            await engine.transcribe_one(said("d"), Priority.INTERIM)
        assert err.value.code == "interim_skipped"
        assert script.priorities == ["interim"]  # one try: the next interim is due anyway
        assert not engine.degraded

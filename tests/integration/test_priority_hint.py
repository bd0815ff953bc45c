"""``X-Voxtral-Priority`` on ``/v1/audio/transcriptions``: queued by only from callers the
server trusts (``server.priority_hints``), and every JSON answer says the engine's capacity
(``X-Voxtral-Capacity``). A real server on 127.0.0.1 with the energy VAD and a fast engine;
the engine queue a request went to is read from ``/metrics``."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from agent.engines.remote import CAPACITY_HEADER, PRIORITY_HEADER
from tests.conftest import make_config
from tests.integration.server_process import Servers, metric, metrics
from tests.integration.test_robustness import Echo
from tests.support.audio_files import wav_bytes

TOKEN = "priority-token-0123456789"
BATCHES = "voxtral_rtc_engine_batch_seconds_count"


def tone() -> bytes:
    t = np.arange(16_000) / 16_000
    return wav_bytes((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))


async def post(url: str, hint: str | None, token: str | None = None) -> aiohttp.ClientResponse:
    headers = {PRIORITY_HEADER: hint} if hint else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    form = aiohttp.FormData()
    form.add_field("file", tone(), filename="u.wav", content_type="audio/wav")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/audio/transcriptions", data=form, headers=headers) as r:
            await r.read()
            return r


@pytest.mark.parametrize(
    ("env", "token", "queued"),
    [
        # The default (authenticated) on a server without tokens: anyone could call, so a
        # hint is ignored and the upload waits as a recorded file.
        ({}, None, {"final": 0, "interim": 0, "file": 2}),
        # With tokens every caller here holds one: the hint is honoured.
        ({"SERVER__AUTH_TOKENS": f"[{TOKEN}]"}, TOKEN, {"final": 1, "interim": 1, "file": 0}),
        # A node only gateways reach.
        ({"SERVER__PRIORITY_HINTS": "any"}, None, {"final": 1, "interim": 1, "file": 0}),
        # Never, even with tokens.
        (
            {"SERVER__AUTH_TOKENS": f"[{TOKEN}]", "SERVER__PRIORITY_HINTS": "none"},
            TOKEN,
            {"final": 0, "interim": 0, "file": 2},
        ),
    ],
)
async def test_a_priority_hint_is_honoured_only_from_trusted_callers(
    servers: Servers, env: dict[str, str], token: str | None, queued: dict[str, int]
) -> None:
    server = await servers.start(make_config(VAD__KIND="energy", ENGINE__LANES="2", **env), Echo())
    for hint in ("final", "interim"):
        resp = await post(server.url, hint, token)
        assert resp.status == 200
        assert resp.headers[CAPACITY_HEADER] == "2"  # 2 lanes of a batch of one
    values = await metrics(server.url, token)
    got = {p: int(metric(values, BATCHES, priority=p)) for p in queued}
    assert got == queued


async def test_an_unknown_hint_is_a_file_and_a_busy_answer_says_the_capacity(
    servers: Servers,
) -> None:
    config = make_config(
        VAD__KIND="energy", SERVER__PRIORITY_HINTS="any", LIMITS__MAX_FILE_JOBS="1"
    )
    server = await servers.start(config, Echo(delay_s=1.0))
    first, second = await asyncio.gather(post(server.url, "urgent!"), post(server.url, None))
    # One ran (an unknown hint is no hint: a file), the other found the one job slot
    # taken; both say the capacity: one job at once (limits.max_file_jobs).
    assert sorted([first.status, second.status]) == [200, 503]
    assert first.headers[CAPACITY_HEADER] == second.headers[CAPACITY_HEADER] == "1"
    values = await metrics(server.url)
    assert metric(values, BATCHES, priority="file") == 1

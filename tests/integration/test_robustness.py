"""Load, faults and hostile input: admission limits, auth and CORS, call duration, the engine
watchdog and lag notices, a closed data channel, send-buffer backpressure, metrics, and 16
calls at once on the real embedded engine. Every server listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from aiortc import RTCPeerConnection
from prometheus_client.parser import text_string_to_metric_families
from threadpoolctl import threadpool_info, threadpool_limits

from agent.config import WebRTCConfig
from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.transports.webrtc_peer import rtc_configuration
from signaling.app import RunningServer, start_server
from tests.conftest import make_config, normalise
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

EV = "conversation.item.input_audio_transcription"
COMPLETED, FAILED, DELTA, INTERIM = (
    f"{EV}.completed",
    f"{EV}.failed",
    f"{EV}.delta",
    f"{EV}.interim",
)
TOKEN = "test-token-0123456789abcdef"


class Echo(Engine):
    """A fast fake at the engine seam: answers every utterance with its length."""

    name = "echo"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        time.sleep(self.delay_s)
        return [EngineResult(f"heard {r.duration_s:.1f} seconds") for r in batch]


class Gate(Engine):
    """The first call blocks until ``release`` is set (or ``hang_s`` passes); then echoes."""

    name = "gate"

    def __init__(self, hang_s: float) -> None:
        self.release = threading.Event()
        self.hang_s = hang_s
        self.calls = 0

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        self.calls += 1
        if self.calls == 1:
            self.release.wait(self.hang_s)
        return [EngineResult("ok") for _ in batch]


def tone(seconds: float, level: float = 0.2) -> npt.NDArray[np.float32]:
    t = np.arange(int(16000 * seconds)) / 16000
    return (level * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


async def offer_body() -> tuple[RTCPeerConnection, dict[str, Any]]:
    """A real SDP offer (audio + the events channel), as a page would POST it."""
    pc = RTCPeerConnection(rtc_configuration(WebRTCConfig()))
    pc.addTransceiver("audio", direction="sendonly")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, {"sdp": pc.localDescription.sdp, "type": "offer"}


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.json()
    assert set(body["error"]) == {"type", "code", "message"}
    return dict(body["error"])


async def wait_for(predicate: Any, timeout: float, step: float = 0.05) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


# -- start-up -------------------------------------------------------------------------------


async def test_numpys_blas_runs_on_one_thread_once_the_server_loads() -> None:
    """OpenBLAS starts a worker per core that spins after every matrix product (each
    decode's log-mel): a third of the server's CPU in a call on 2 cores. The limit is
    process-wide, so it is raised first: only this server's start-up can bring it to 1."""

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    threadpool_limits(limits=2, user_api="blas")
    assert blas_threads() == [2]
    server = await start_server(make_config(VAD__KIND="energy"), engine=Echo())
    try:
        assert blas_threads() == [1]
    finally:
        await server.stop()


# -- admission ------------------------------------------------------------------------------


async def test_full_server_answers_503_with_retry_after() -> None:
    server = await start_server(make_config(LIMITS__MAX_CALLS="1"), engine=Echo())
    pcs: list[RTCPeerConnection] = []
    try:
        async with RealtimeClient(server.url) as first:
            await first.connect(ArrayAudioTrack(np.zeros(16000, np.float32)))
            pc, body = await offer_body()
            pcs.append(pc)
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{server.url}/api/offer", json=body) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "10"
                    assert (await error_of(resp))["code"] == "too_many_calls"
            assert len(server.state.calls) == 1
    finally:
        for pc in pcs:
            await pc.close()
        await server.stop()


async def test_offers_are_rate_limited_per_address() -> None:
    server = await start_server(make_config(LIMITS__OFFERS_PER_MINUTE_PER_IP="2"), engine=Echo())
    try:
        async with aiohttp.ClientSession() as http:
            statuses = []
            for _ in range(3):
                async with http.post(f"{server.url}/api/offer", data=b"{bad") as resp:
                    statuses.append(resp.status)
                    last = resp
                    error = await error_of(resp)
            assert statuses == [400, 400, 429]  # bad requests take a token too
            assert error["code"] == "rate_limit_exceeded"
            assert last.headers["Retry-After"] == "30"  # 2 per minute: one token every 30 s
            async with http.patch(f"{server.url}/api/offer", json={"pc_id": "x"}) as resp:
                assert resp.status == 400  # trickle ICE is not limited
            async with http.get(f"{server.url}/healthz") as resp:
                assert resp.status == 200
    finally:
        await server.stop()


# -- auth and CORS -------------------------------------------------------------------------


async def test_bearer_token_guards_the_api_and_metrics_only() -> None:
    server = await start_server(make_config(SERVER__AUTH_TOKENS=f"[{TOKEN}]"), engine=Echo())
    pc, body = await offer_body()
    good = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/app.js", "/healthz", "/readyz"):
                async with http.get(f"{server.url}{path}") as resp:
                    assert resp.status == 200, path
            for method, path in (
                ("GET", "/api/config"),
                ("GET", "/metrics"),
                ("POST", "/api/offer"),
                ("PATCH", "/api/offer"),
                ("POST", "/v1/audio/transcriptions"),
            ):
                async with http.request(method, f"{server.url}{path}") as resp:
                    assert resp.status == 401, path
                    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="voxtral-rtc"'
                    assert (await error_of(resp))["code"] == "unauthorized"
            wrong = {"Authorization": "Bearer not-the-token-at-all-no"}
            async with http.get(f"{server.url}/api/config", headers=wrong) as resp:
                assert resp.status == 401
                assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
                assert (await error_of(resp))["code"] == "invalid_token"
            async with http.get(f"{server.url}/api/config", headers=good) as resp:
                assert resp.status == 200
            async with http.get(f"{server.url}/metrics", headers=good) as resp:
                assert resp.status == 200
            async with http.post(f"{server.url}/api/offer", json=body, headers=good) as resp:
                assert resp.status == 200
                assert (await resp.json())["type"] == "answer"
    finally:
        await pc.close()
        await server.stop()


async def test_cors_allow_list_and_preflight() -> None:
    allowed, evil = "https://app.example.com", "https://evil.example.com"
    config = make_config(SERVER__CORS_ORIGINS=f"[{allowed}]", SERVER__AUTH_TOKENS=f"[{TOKEN}]")
    server = await start_server(config, engine=Echo())
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/api/offer", "/v1/audio/transcriptions"):
                # A preflight carries no token: it must not need one.
                headers = {**preflight, "Origin": allowed}
                async with http.options(f"{server.url}{path}", headers=headers) as resp:
                    assert resp.status == 204, path
                    assert resp.headers["Access-Control-Allow-Origin"] == allowed
                    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
                    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                headers = {**preflight, "Origin": evil}
                async with http.options(f"{server.url}{path}", headers=headers) as resp:
                    assert resp.status == 403
                    assert "Access-Control-Allow-Origin" not in resp.headers
                    assert (await error_of(resp))["code"] == "origin_not_allowed"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(
                f"{server.url}/api/config", headers={**auth, "Origin": allowed}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == allowed
                assert "Origin" in resp.headers.getall("Vary")
            async with http.get(
                f"{server.url}/api/config", headers={**auth, "Origin": evil}
            ) as resp:
                assert resp.status == 200  # not a browser: CORS only withholds the header
                assert "Access-Control-Allow-Origin" not in resp.headers
            async with http.get(f"{server.url}/api/config", headers={"Origin": allowed}) as resp:
                assert resp.status == 401  # the page can read why: the error carries CORS
                assert resp.headers["Access-Control-Allow-Origin"] == allowed
    finally:
        await server.stop()


async def test_star_origin_allows_any_page() -> None:
    server = await start_server(make_config(SERVER__CORS_ORIGINS="['*']"), engine=Echo())
    try:
        async with aiohttp.ClientSession() as http:
            headers = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"}
            async with http.options(f"{server.url}/api/offer", headers=headers) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
            async with http.get(f"{server.url}/healthz", headers=headers) as resp:
                assert "Access-Control-Allow-Origin" not in resp.headers  # API paths only
    finally:
        await server.stop()


# -- call lifetime ---------------------------------------------------------------------------


async def test_max_call_duration_flushes_the_open_utterance_and_ends_the_call() -> None:
    config = make_config(VAD__KIND="energy", LIMITS__MAX_CALL_S="2")
    server = await start_server(config, engine=Echo())
    try:
        async with RealtimeClient(server.url) as client:
            # A tone that never pauses: the utterance is still open when the limit hits.
            await client.connect(ArrayAudioTrack(tone(10)))
            session = server.state.calls[client.pc_id]
            await client.next_event("input_audio_buffer.speech_started", timeout=5)
            t0 = time.perf_counter()
            expired = await client.next_event("error", timeout=8)
            assert expired.event["error"]["code"] == "session_expired"
            await asyncio.wait_for(session.wait_closed(), 5)
            assert time.perf_counter() - t0 < 4
            assert session.end_reason == "max_duration"
            # One utterance, open until the limit closed it: flushed, not lost.
            (started,) = client.of_type("input_audio_buffer.speech_started")
            (stopped,) = client.of_type("input_audio_buffer.speech_stopped")
            assert stopped["audio_end_ms"] > 1000  # the end of the call's audio, not a pause
            (done,) = client.of_type(COMPLETED)
            assert done["item_id"] == started["item_id"]
            assert done["transcript"].startswith("heard")
            types = [r.type for r in client.received]
            assert types.index(COMPLETED) < types.index("error")
            assert not server.state.calls
    finally:
        await server.stop()


async def test_closed_data_channel_ends_the_call(echo_server: RunningServer) -> None:
    async with RealtimeClient(echo_server.url) as client:
        await client.connect(ArrayAudioTrack(tone(20)))
        session = echo_server.state.calls[client.pc_id]
        await client.next_event("input_audio_buffer.speech_started", timeout=5)
        assert client.channel is not None
        client.channel.close()  # the peer connection itself stays up and keeps sending
        await asyncio.wait_for(session.wait_closed(), 5)
        assert session.end_reason == "data_channel_closed"
        assert session.utterances == 1  # the open utterance was still flushed to the engine
        assert not echo_server.state.calls
        assert all(t.done() for t in session.session._tasks)


# -- engine faults and lag ------------------------------------------------------------------


async def test_hung_engine_call_fails_with_engine_timeout_and_the_call_goes_on(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    engine = Gate(hang_s=4.0)
    config = make_config(
        ENGINE__WATCHDOG_S="1", ENGINE__INTERIM_INTERVAL_MS="0", ENGINE__SPECULATIVE_FINAL="false"
    )
    server = await start_server(config, engine=engine)
    try:
        async with RealtimeClient(server.url) as client, aiohttp.ClientSession() as http:
            await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 3.2)]))
            failed = await client.next_event(FAILED, timeout=15)
            assert failed.event["error"]["code"] == "engine_timeout"
            async with http.get(f"{server.url}/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
                assert body["status"] == "degraded" and body["engine_timeouts"] == 1
            done = await client.next_event(COMPLETED, timeout=15)  # on a fresh engine thread
            assert done.event["transcript"] == "ok"
            engine.release.set()
            await wait_for(lambda: not server.state.worker.degraded, 5)
            async with http.get(f"{server.url}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"{server.url}/metrics") as resp:
                metrics = scrape(await resp.text())
            assert metrics[("voxtral_rtc_engine_timeouts_total", ())] == 1
            key = (
                "voxtral_rtc_errors_total",
                (("code", "engine_timeout"), ("source", "transcription")),
            )
            assert metrics[key] == 1
    finally:
        engine.release.set()
        await server.stop()


async def test_engine_behind_real_time_sends_engine_lag(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    engine = Gate(hang_s=20.0)  # holds the first final until the test has seen the notice
    config = make_config(ENGINE__INTERIM_INTERVAL_MS="0", ENGINE__SPECULATIVE_FINAL="false")
    server = await start_server(config, engine=engine)
    try:
        async with RealtimeClient(server.url) as client:
            await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 3.2)]))
            lag = await client.next_event("voxtral.engine_lag", timeout=15)
            committed = client.of_type("input_audio_buffer.committed")
            assert len(committed) == 2
            # The second phrase waits behind the first, which the engine holds.
            assert lag.event["item_id"] == committed[1]["item_id"]
            assert lag.event["lag_ms"] >= 1000 and lag.event["queue_depth"] >= 1
            engine.release.set()
            await client.next_event(COMPLETED, timeout=10)
            second = await client.next_event(COMPLETED, timeout=10)
            assert second.event["timings"]["queue_ms"] >= 1000
            assert second.event["lag_ms"] == 0  # nothing waits any more
    finally:
        engine.release.set()
        await server.stop()


# -- sending under backpressure ------------------------------------------------------------


async def test_full_send_buffer_drops_deltas_never_finals(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    server = await start_server(make_config(VAD__KIND="energy"), engine=Echo(0.05))
    try:
        async with RealtimeClient(server.url) as client:
            audio = np.concatenate([np.zeros(8000, np.float32), beckett_audio[: 16000 * 3]])
            await client.connect(ArrayAudioTrack(audio))
            client.send({"type": "session.update", "session": {"include_interim": True}})
            await client.next_event("session.updated", timeout=5)
            session = server.state.calls[client.pc_id]
            await wait_for(lambda: session.session._sink is not None, 5)
            # The sink now reports a full send buffer: a client that never reads.
            session.session._sink.buffered_amount = lambda: 10**9  # type: ignore[method-assign,union-attr]
            await client.next_event(COMPLETED, timeout=10)
            await client.next_event(COMPLETED, timeout=10)
            assert not client.of_type(DELTA) and not client.of_type(INTERIM)
            assert session.dropped_events > 0
            assert client.of_type("input_audio_buffer.committed")  # other events still go
    finally:
        await server.stop()


# -- metrics ---------------------------------------------------------------------------------


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_after_a_call(
    echo_server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{echo_server.url}/api/offer", data=b"[") as resp:
            assert resp.status == 400
        async with RealtimeClient(echo_server.url) as client:
            await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 1.6)]))
            client.send_raw("{not json")
            await client.next_event("error", timeout=5)
            await client.next_event(COMPLETED, timeout=10)
            async with http.get(f"{echo_server.url}/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                during = scrape(await resp.text())
        await wait_for(lambda: not echo_server.state.calls, 5)
        async with http.get(f"{echo_server.url}/metrics") as resp:
            after = scrape(await resp.text())
    assert during[("voxtral_rtc_calls_active", ())] == 1
    assert after[("voxtral_rtc_calls_active", ())] == 0
    assert after[("voxtral_rtc_calls_started_total", ())] == 1
    assert sum(v for (n, _), v in after.items() if n == "voxtral_rtc_calls_ended_total") == 1
    assert after[("voxtral_rtc_utterances_total", ())] >= 1
    assert after[("voxtral_rtc_end_of_speech_to_final_seconds_count", ())] >= 1
    assert after[("voxtral_rtc_end_of_speech_to_final_seconds_sum", ())] > 0
    batches = [v for (n, _), v in after.items() if n == "voxtral_rtc_engine_batch_seconds_count"]
    assert sum(batches) >= 1
    assert after[("voxtral_rtc_audio_lag_seconds_count", ())] > 10
    assert after[("voxtral_rtc_engine_queue_depth", ())] == 0
    assert ("voxtral_rtc_skipped_interims_total", ()) in after
    assert after[("voxtral_rtc_engine_finals_total", (("outcome", "completed"),))] >= 1
    protocol = (("code", "invalid_json"), ("source", "protocol"))
    http_err = (("code", "invalid_json"), ("source", "http"))
    assert after[("voxtral_rtc_errors_total", protocol)] == 1
    assert after[("voxtral_rtc_errors_total", http_err)] == 1


# -- load ------------------------------------------------------------------------------------


async def test_sixteen_calls_at_once_on_the_embedded_engine_lose_nothing(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    n_calls = 16
    server = await start_server(make_config(LIMITS__MAX_CALLS="32"), engine=embedded_engine)
    audio = beckett_audio[: 16000 * 3]  # "ever tried" and "ever failed"

    async def one_call() -> RealtimeClient:
        client = RealtimeClient(server.url)
        await client.connect(ArrayAudioTrack(audio))
        finals = 0
        while finals < 2:
            ev = await client.next_event(timeout=90)
            finals += ev.type in (COMPLETED, FAILED)
        await client.close()
        return client

    try:
        t0 = time.perf_counter()
        clients = await asyncio.wait_for(asyncio.gather(*(one_call() for _ in range(n_calls))), 150)
        elapsed = time.perf_counter() - t0
        for client in clients:
            assert not client.of_type(FAILED)
            texts = [normalise(c["transcript"]) for c in client.of_type(COMPLETED)]
            assert len(texts) == 2, texts
            assert "tried" in texts[0] and "fail" in texts[1], texts
        await wait_for(lambda: not server.state.calls, 15)
        print(f"{n_calls} calls, {2 * n_calls} finals in {elapsed:.1f} s")
    finally:
        await server.stop()


async def test_python_client_calls_an_authenticated_server() -> None:
    server = await start_server(make_config(SERVER__AUTH_TOKENS=f"[{TOKEN}]"), engine=Echo())
    try:
        silence = np.zeros(16000, np.float32)
        async with RealtimeClient(server.url) as anonymous:
            with pytest.raises(RuntimeError, match="401"):
                await anonymous.connect(ArrayAudioTrack(silence))
        async with RealtimeClient(server.url, token=TOKEN) as client:
            await client.connect(ArrayAudioTrack(silence))
            created = await client.next_event("session.created", timeout=10)
            assert created.event["session"]["id"]
    finally:
        await server.stop()

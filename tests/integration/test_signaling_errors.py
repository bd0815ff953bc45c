"""Bad signalling input gets a 4xx JSON error and the server keeps serving."""

from __future__ import annotations

import aiohttp
import pytest

from signaling.app import RunningServer

SDP_GARBAGE = "v=0\r\nm=audio this is not sdp\r\n"


async def _status_and_error(resp: aiohttp.ClientResponse) -> tuple[int, dict]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message"}
    assert "Traceback" not in body["error"]["message"]
    return resp.status, body["error"]


@pytest.mark.parametrize(
    ("method", "kwargs", "status", "code"),
    [
        (
            "POST",
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ("POST", {"json": [1, 2, 3]}, 400, "invalid_json"),
        ("POST", {"json": {"sdp": "v=0", "type": "answer"}}, 400, "invalid_type"),
        ("POST", {"json": {"type": "offer"}}, 400, "invalid_sdp"),
        ("POST", {"json": {"sdp": "hello", "type": "offer"}}, 400, "invalid_sdp"),
        ("POST", {"json": {"sdp": SDP_GARBAGE, "type": "offer"}}, 400, "invalid_sdp"),
        (
            "POST",
            {"json": {"sdp": SDP_GARBAGE, "type": "offer", "pc_id": "nope"}},
            404,
            "unknown_pc_id",
        ),
        (
            "POST",
            {"json": {"sdp": "v=0 m=audio", "type": "offer", "pc_id": 7}},
            400,
            "invalid_value",
        ),
        (
            "POST",
            {"data": b"x" * 300_000, "headers": {"Content-Type": "application/json"}},
            413,
            "request_too_large",
        ),
        ("PATCH", {"json": {"pc_id": "nope", "candidates": []}}, 404, "unknown_pc_id"),
        ("PATCH", {"json": {"candidates": []}}, 400, "invalid_value"),
        ("PATCH", {"json": {"pc_id": "x", "candidates": "no"}}, 400, "invalid_value"),
        (
            "PATCH",
            {"data": b"]]", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ("GET", {}, 405, "method_not_allowed"),
    ],
)
async def test_bad_offer_requests(
    server: RunningServer, method: str, kwargs: dict, status: int, code: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{server.url}/api/offer", **kwargs) as resp:
            got_status, error = await _status_and_error(resp)
        assert (got_status, error["code"]) == (status, code), error
        async with http.get(f"{server.url}/healthz") as health:
            assert health.status == 200
            assert (await health.json())["status"] == "ok"
    assert not server.state.calls  # nothing half-created was left behind


async def test_unknown_path_is_json_404(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/nothing") as resp:
            status, error = await _status_and_error(resp)
    assert (status, error["code"]) == (404, "not_found")


async def test_bad_trickle_candidate_for_live_call(server: RunningServer) -> None:
    import numpy as np

    from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

    async with RealtimeClient(server.url) as client:
        await client.connect(ArrayAudioTrack(np.zeros(16000, np.float32)))
        async with aiohttp.ClientSession() as http:
            body = {"pc_id": client.pc_id, "candidates": [{"candidate": "candidate:garbage"}]}
            async with http.patch(f"{server.url}/api/offer", json=body) as resp:
                status, error = await _status_and_error(resp)
            assert (status, error["code"]) == (400, "invalid_candidate")
            good = {
                "pc_id": client.pc_id,
                "candidates": [
                    {
                        "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
                        "sdp_mid": "0",
                        "sdp_mline_index": 0,
                    },
                    {"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0},
                ],
            }
            async with http.patch(f"{server.url}/api/offer", json=good) as resp:
                assert resp.status == 204


async def test_health_ready_and_page_config(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"status": "ready", "engine": "whisper-tiny.en"}
        async with http.get(f"{server.url}/api/config") as resp:
            cfg = await resp.json()
        assert cfg == {
            "ice_servers": [],
            "data_channel": "oai-events",
            "engine": "whisper-tiny.en",
            "ready": True,
        }
        async with http.get(f"{server.url}/") as resp:
            assert resp.status == 200 and "text/html" in resp.content_type
        async with http.get(f"{server.url}/app.js") as resp:
            assert resp.status == 200


async def test_not_ready_while_engine_loads(embedded_engine: object) -> None:
    """Before the engine is warmed up, readiness and offers answer 503."""
    import asyncio

    from agent.engines.base import Engine, EngineRequest, EngineResult
    from signaling.app import start_server
    from tests.conftest import make_config

    gate = asyncio.Event()

    class SlowWarmup(Engine):
        name = "slow"

        def warmup(self) -> None:
            import time

            while not gate.is_set():
                time.sleep(0.01)

        def transcribe(self, batch: list[EngineRequest]) -> list[EngineResult]:  # type: ignore[override]
            return [EngineResult("") for _ in batch]

    running = await start_server(make_config(), engine=SlowWarmup(), wait_ready=False)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{running.url}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{running.url}/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "loading"
            async with http.post(
                f"{running.url}/api/offer", json={"sdp": "v=0 m=audio", "type": "offer"}
            ) as resp:
                status, error = await _status_and_error(resp)
                assert (status, error["code"]) == (503, "not_ready")
                assert resp.headers["Retry-After"] == "5"
            gate.set()
            for _ in range(100):
                async with http.get(f"{running.url}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 200
    finally:
        gate.set()
        await running.stop()

"""Hostile signalling: trickle ICE as a reflector, restart races, other owners' calls,
cross-site form posts, clients that vanish mid-offer.

Everything stays on 127.0.0.1: the server gathers only there, the "victims" of the trickled
candidates are UDP sockets of this test that count the STUN checks the server sends them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from agent.config import WebRTCConfig
from agent.transports.webrtc_peer import rtc_configuration
from signaling import routes
from signaling.app import RunningServer, start_server
from tests.conftest import make_config
from tests.integration.test_robustness import Echo, wait_for
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

STUN_COOKIE = b"\x21\x12\xa4\x42"
ALPHA = "alpha-token-0123456789"
BETA = "beta-token-0123456789"


class StunCounter(asyncio.DatagramProtocol):
    """A UDP port on 127.0.0.1 that counts the STUN messages it receives."""

    def __init__(self) -> None:
        self.stun = 0
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 20 and data[4:8] == STUN_COOKIE:
            self.stun += 1


async def listen(count: int) -> tuple[list[StunCounter], list[asyncio.BaseTransport]]:
    loop = asyncio.get_running_loop()
    counters, transports = [], []
    for _ in range(count):
        transport, counter = await loop.create_datagram_endpoint(
            StunCounter, local_addr=("127.0.0.1", 0)
        )
        counters.append(counter)
        transports.append(transport)
    return counters, transports


async def fresh_offer(keep_candidates: bool = True) -> tuple[RTCPeerConnection, str]:
    """A real aiortc offer (audio + the events channel). Without its candidates the server's
    ICE keeps waiting for trickled ones, as it does for a browser that trickles."""
    pc = RTCPeerConnection(rtc_configuration(WebRTCConfig()))
    pc.addTransceiver("audio", direction="sendonly")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    if not keep_candidates:
        lines = sdp.split("\r\n")
        sdp = "\r\n".join(
            line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))
        )
    return pc, sdp


def ice_ufrag(sdp: str) -> str:
    return next(
        line.split(":", 1)[1] for line in sdp.split("\r\n") if line.startswith("a=ice-ufrag:")
    )


def candidate(port: int, foundation: str, mid: str | None = "0", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "candidate": f"candidate:{foundation} 1 udp 2130706431 127.0.0.1 {port} typ host",
        **extra,
    }
    if mid is not None:
        entry["sdp_mid"] = mid
    return entry


async def request(
    http: aiohttp.ClientSession, method: str, url: str, body: Any, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, f"{url}/api/offer", json=body, headers=headers) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else {}


@pytest.fixture
def peers(monkeypatch: pytest.MonkeyPatch) -> list[RTCPeerConnection]:
    """Every server-side peer the offer route creates."""
    created: list[RTCPeerConnection] = []
    real = routes.new_peer_connection

    def counting(config: WebRTCConfig) -> RTCPeerConnection:
        pc = real(config)
        created.append(pc)
        return pc

    monkeypatch.setattr(routes, "new_peer_connection", counting)
    return created


def live(created: list[RTCPeerConnection]) -> list[RTCPeerConnection]:
    return [pc for pc in created if pc.connectionState != "closed"]


# -- trickle ICE ----------------------------------------------------------------------------


async def test_trickle_flood_is_refused_and_checks_go_to_the_cap_only(
    echo_server: RunningServer,
) -> None:
    """The reported attack (ten PATCHes of 64 candidates) reaches nobody; a client that
    trickles in small batches gets ``limits.candidates_per_call`` (32) and no more."""
    cap = echo_server.state.config.limits.candidates_per_call
    assert cap == 32
    counters, transports = await listen(64)
    client, sdp = await fresh_offer(keep_candidates=False)
    try:
        async with aiohttp.ClientSession() as http:
            status, answer = await request(
                http, "POST", echo_server.url, {"sdp": sdp, "type": "offer"}
            )
            assert status == 200, answer
            pc_id = answer["pc_id"]
            flood = []
            for n in range(10):
                body = {
                    "pc_id": pc_id,
                    "candidates": [candidate(c.port, f"f{n}x{i}") for i, c in enumerate(counters)],
                }
                flood.append(await request(http, "PATCH", echo_server.url, body))
            assert [s for s, _ in flood] == [400] * 10, flood
            assert {e["error"]["code"] for _, e in flood} == {"too_many_candidates"}

            batches = []
            for n in range(5):  # 8 at a time, as a trickling client might
                batch = counters[8 * n : 8 * n + 8]
                body = {
                    "pc_id": pc_id,
                    "candidates": [candidate(c.port, f"b{n}x{i}") for i, c in enumerate(batch)],
                }
                batches.append(await request(http, "PATCH", echo_server.url, body))
            assert [s for s, _ in batches] == [204, 204, 204, 204, 400], batches
            assert batches[-1][1]["error"]["code"] == "too_many_candidates"

        # The accepted candidates are really checked (so the counters do see STUN)...
        await wait_for(lambda: all(c.stun for c in counters[:cap]), 10)
        await asyncio.sleep(1.0)
        print(f"STUN messages received per port: {[c.stun for c in counters]}")
        # ...and nothing went anywhere else: not to the flood, not past the cap.
        assert [c.stun for c in counters[cap:]] == [0] * (64 - cap)
    finally:
        await client.close()
        for t in transports:
            t.close()


async def test_trickled_candidates_must_belong_to_the_call_ice_session(
    echo_server: RunningServer,
) -> None:
    counters, transports = await listen(8)
    client, sdp = await fresh_offer(keep_candidates=False)
    ufrag = ice_ufrag(sdp)
    refused = [
        candidate(counters[0].port, "a", mid="7"),  # no such media section
        candidate(counters[1].port, "b", mid=None, sdp_mline_index=5),
        candidate(counters[2].port, "c", mid="0", sdp_mline_index=1),  # mid and index disagree
        candidate(counters[3].port, "d", usernameFragment="not-" + ufrag),  # another session
        {  # the line's own ufrag attribute names another session
            "candidate": f"candidate:e 1 udp 2130706431 127.0.0.1 {counters[4].port} typ host"
            " generation 0 ufrag zzzz",
            "sdp_mid": "0",
        },
        candidate(counters[5].port, "f", mid=None),  # names no section at all
    ]
    try:
        async with aiohttp.ClientSession() as http:
            status, answer = await request(
                http, "POST", echo_server.url, {"sdp": sdp, "type": "offer"}
            )
            assert status == 200, answer
            pc_id = answer["pc_id"]
            for entry in refused:
                status, error = await request(
                    http, "PATCH", echo_server.url, {"pc_id": pc_id, "candidates": [entry]}
                )
                assert status == 400, entry
                assert error["error"]["code"] == "invalid_candidate", entry
            good = [
                candidate(counters[6].port, "g", usernameFragment=ufrag),
                {
                    "candidate": f"candidate:h 1 udp 2130706431 127.0.0.1 {counters[7].port}"
                    f" typ host generation 0 ufrag {ufrag}",
                    "sdp_mline_index": 0,
                },
                # An mDNS name is ignored: resolving it would multicast to the LAN.
                {"candidate": "candidate:i 1 udp 2130706431 abcd.local 9 typ host", "sdp_mid": "0"},
            ]
            status, _ = await request(
                http, "PATCH", echo_server.url, {"pc_id": pc_id, "candidates": good}
            )
            assert status == 204
            assert echo_server.state.records[pc_id].candidates == 2
        await wait_for(lambda: counters[6].stun > 0 and counters[7].stun > 0, 10)
        await asyncio.sleep(1.0)
        assert [c.stun for c in counters[:6]] == [0] * 6
    finally:
        await client.close()
        for t in transports:
            t.close()


async def test_trickle_is_rate_limited_per_address() -> None:
    config = make_config(VAD__KIND="energy", LIMITS__PATCHES_PER_MINUTE_PER_IP="3")
    server = await start_server(config, engine=Echo())
    try:
        async with aiohttp.ClientSession() as http:
            body = {"pc_id": "nope", "candidates": []}
            got = [await request(http, "PATCH", server.url, body) for _ in range(3)]
            assert [s for s, _ in got] == [404] * 3  # every attempt takes a token
            async with http.patch(f"{server.url}/api/offer", json=body) as resp:
                assert resp.status == 429
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
                assert int(resp.headers["Retry-After"]) >= 1
    finally:
        await server.stop()


# -- restart race ---------------------------------------------------------------------------


async def test_concurrent_restarts_leave_exactly_one_peer(
    echo_server: RunningServer, peers: list[RTCPeerConnection]
) -> None:
    first = RealtimeClient(echo_server.url)
    offers = []
    try:
        await first.connect(ArrayAudioTrack(np.zeros(16000 * 30, np.float32)))
        pc_id = first.pc_id
        offers = [await fresh_offer() for _ in range(8)]
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(
                *(
                    request(
                        http,
                        "POST",
                        echo_server.url,
                        {"sdp": sdp, "type": "offer", "pc_id": pc_id, "restart_pc": True},
                    )
                    for _, sdp in offers
                )
            )
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 404} and 200 in statuses, results
        await asyncio.sleep(0.5)
        assert list(echo_server.state.calls) == [pc_id]
        assert live(peers) == [echo_server.state.calls[pc_id].pc], len(live(peers))
        assert echo_server.state.reserved == 0
        await echo_server.stop()
        assert live(peers) == []
    finally:
        await first.close()
        for pc, _ in offers:
            await pc.close()


# -- owners ---------------------------------------------------------------------------------


async def test_another_token_cannot_touch_the_call(peers: list[RTCPeerConnection]) -> None:
    config = make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=f"{ALPHA},{BETA}")
    server = await start_server(config, engine=Echo())
    first = RealtimeClient(server.url, token=ALPHA)
    other, sdp = await fresh_offer()
    try:
        await first.connect(ArrayAudioTrack(np.zeros(16000 * 30, np.float32)))
        pc_id = first.pc_id
        session = server.state.calls[pc_id]
        ufrag = ice_ufrag(first.pc.localDescription.sdp)
        async with aiohttp.ClientSession() as http:
            _, unknown = await request(
                http, "POST", server.url, {"sdp": sdp, "type": "offer", "pc_id": "x"}, BETA
            )
            attempts = [
                ("POST", {"sdp": sdp, "type": "offer", "pc_id": pc_id, "restart_pc": True}),
                ("POST", {"sdp": sdp, "type": "offer", "pc_id": pc_id}),
                (
                    "PATCH",
                    {"pc_id": pc_id, "candidates": [candidate(9, "x", usernameFragment=ufrag)]},
                ),
            ]
            for method, body in attempts:
                status, error = await request(http, method, server.url, body, BETA)
                assert status == 404, (method, body, error)
                # Exactly what an unknown pc_id gets: the call's existence is not revealed.
                assert error["error"]["code"] == unknown["error"]["code"] == "unknown_pc_id"
                assert error["error"]["message"] == unknown["error"]["message"].replace(
                    "'x'", repr(pc_id)
                )
            assert server.state.calls[pc_id] is session and not session.closed
            assert len(peers) == 1  # no peer was even built for the other token
            # The owner still can.
            body = {"pc_id": pc_id, "candidates": [candidate(9, "y", usernameFragment=ufrag)]}
            assert (await request(http, "PATCH", server.url, body, ALPHA))[0] == 204
    finally:
        await first.close()
        await other.close()
        await server.stop()


# -- cross-site form posts ------------------------------------------------------------------


async def test_offer_and_trickle_need_a_json_content_type(echo_server: RunningServer) -> None:
    client, sdp = await fresh_offer()
    try:
        async with aiohttp.ClientSession() as http:
            text = json.dumps({"sdp": sdp, "type": "offer"})
            for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
                headers = {"Content-Type": ctype} if ctype else {}
                async with http.post(
                    f"{echo_server.url}/api/offer", data=text.encode(), headers=headers
                ) as resp:
                    assert resp.status == 415, ctype
                    assert (await resp.json())["error"]["code"] == "unsupported_media_type"
            async with http.patch(
                f"{echo_server.url}/api/offer",
                data=json.dumps({"pc_id": "x", "candidates": []}),
                headers={"Content-Type": "text/plain"},
            ) as resp:
                assert resp.status == 415
            assert not echo_server.state.calls
            async with http.post(
                f"{echo_server.url}/api/offer",
                data=text,
                headers={"Content-Type": "application/json; charset=utf-8"},
            ) as resp:
                assert resp.status == 200
    finally:
        await client.close()


# -- clients that vanish mid-request --------------------------------------------------------


async def _abandon(
    http: aiohttp.ClientSession, method: str, url: str, body: Any, entered: asyncio.Event
) -> None:
    """Send a request, then go away (close the connection) while the server is inside it."""
    task = asyncio.create_task(request(http, method, url, body))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_offers_and_trickles_cancelled_mid_way_release_everything(
    echo_server: RunningServer,
    peers: list[RTCPeerConnection],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = echo_server.state
    entered = asyncio.Event()
    hang = asyncio.Event()
    real_answer = routes._answer

    async def stalling_answer(pc: Any, description: Any, config: WebRTCConfig) -> Any:
        if not hang.is_set():
            return await real_answer(pc, description, config)
        entered.set()
        await asyncio.Event().wait()  # until the handler is cancelled

    monkeypatch.setattr(routes, "_answer", stalling_answer)
    first = RealtimeClient(echo_server.url)
    offers = [await fresh_offer() for _ in range(3)]
    try:
        await first.connect(ArrayAudioTrack(np.zeros(16000 * 30, np.float32)))
        pc_id = first.pc_id
        async with aiohttp.ClientSession() as http:
            hang.set()
            # A new call abandoned while its offer is answered: its peer and slot go.
            await _abandon(
                http, "POST", echo_server.url, {"sdp": offers[0][1], "type": "offer"}, entered
            )
            await wait_for(lambda: len(live(peers)) == 1 and state.reserved == 0, 10)
            assert list(state.calls) == [pc_id]

            # A restart abandoned after the old peer closed: the new one goes too, and the
            # pc_id's lock is free again (a later PATCH does not wait for it).
            entered.clear()
            body = {"sdp": offers[1][1], "type": "offer", "pc_id": pc_id, "restart_pc": True}
            await _abandon(http, "POST", echo_server.url, body, entered)
            await wait_for(lambda: not live(peers) and state.reserved == 0, 10)
            assert not state.calls and not state.records

            # A trickle abandoned inside the peer: the lock is released for the next one.
            hang.clear()
            status, answer = await request(
                http, "POST", echo_server.url, {"sdp": offers[2][1], "type": "offer"}
            )
            assert status == 200
            new_id = answer["pc_id"]
            session = state.calls[new_id]
            entered.clear()
            real_add = session.pc.addIceCandidate

            async def stalling_add(c: Any) -> None:
                entered.set()
                await asyncio.Event().wait()

            session.pc.addIceCandidate = stalling_add  # type: ignore[method-assign]
            body = {"pc_id": new_id, "candidates": [candidate(9, "a")]}
            await _abandon(http, "PATCH", echo_server.url, body, entered)
            session.pc.addIceCandidate = real_add  # type: ignore[method-assign]
            status, _ = await asyncio.wait_for(
                request(http, "PATCH", echo_server.url, {"pc_id": new_id, "candidates": []}), 5
            )
            assert status == 204
            offered = offers[2][1].count("a=candidate:")
            # The abandoned one was spent, after those of the offer.
            assert state.records[new_id].candidates == offered + 1
    finally:
        await first.close()
        for pc, _ in offers:
            await pc.close()


async def test_candidates_in_the_offer_count_against_the_same_cap(
    echo_server: RunningServer, peers: list[RTCPeerConnection]
) -> None:
    """An offer is a second way to hand the server candidates to check: one that carries
    more than ``limits.candidates_per_call`` is refused before any peer exists, and those it
    carries leave fewer for trickling."""
    counters, transports = await listen(40)
    pc, sdp = await fresh_offer(keep_candidates=False)
    try:
        lines = [
            f"a=candidate:{i} 1 udp 2130706431 127.0.0.1 {c.port} typ host"
            for i, c in enumerate(counters)
        ]
        at = sdp.index("a=mid:")
        flood = sdp[:at] + "\r\n".join(lines) + "\r\n" + sdp[at:]
        async with aiohttp.ClientSession() as http:
            status, body = await request(
                http, "POST", echo_server.url, {"sdp": flood, "type": "offer"}
            )
            assert (status, body["error"]["code"]) == (400, "too_many_candidates")
            assert peers == []
            limit = echo_server.state.config.limits.candidates_per_call
            some = sdp[:at] + "\r\n".join(lines[: limit - 2]) + "\r\n" + sdp[at:]
            status, body = await request(
                http, "POST", echo_server.url, {"sdp": some, "type": "offer"}
            )
            assert status == 200, body
            trickle = [candidate(counters[-1 - i].port, f"t{i}") for i in range(3)]
            status, body = await request(
                http, "PATCH", echo_server.url, {"pc_id": body["pc_id"], "candidates": trickle}
            )
            assert (status, body["error"]["code"]) == (400, "too_many_candidates")
        await asyncio.sleep(1.0)
        assert sum(c.stun for c in counters[limit - 2 :]) == 0
    finally:
        await pc.close()
        for transport in transports:
            transport.close()


async def test_a_burst_of_offers_cannot_pass_max_calls(peers: list[RTCPeerConnection]) -> None:
    """Each offer reserves its call slot before its first await: eight at once against a
    limit of three give three calls and five 503s, never more calls than the limit."""
    config = make_config(VAD__KIND="energy", LIMITS__MAX_CALLS="3")
    server = await start_server(config, engine=Echo())
    clients = [await fresh_offer() for _ in range(8)]
    try:
        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(
                *(
                    request(http, "POST", server.url, {"sdp": sdp, "type": "offer"})
                    for _, sdp in clients
                )
            )
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * 3 + [503] * 5, answers
        assert {a["error"]["code"] for s, a in answers if s == 503} == {"too_many_calls"}
        assert len(server.state.calls) == 3 and len(peers) == 3
    finally:
        for pc, _ in clients:
            await pc.close()
        await server.stop()

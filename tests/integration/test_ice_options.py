"""``webrtc.udp_ports``, ``webrtc.public_address`` and ``webrtc.turn_secret`` on a real server
(in process, loopback) with real aiortc callers. The same options through a real NAT and a
real coturn: ``test_nat.py``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from agent.config import WebRTCConfig
from agent.errors import ConfigError
from agent.transports.webrtc_peer import rtc_configuration, server_rtc_configuration
from signaling.app import RunningServer, start_server
from tests.conftest import make_config
from tests.integration.test_robustness import Echo

PUBLIC = "198.51.100.7"  # TEST-NET-2: documentation only, never routed


def free_range(size: int) -> tuple[int, int]:
    """``size`` consecutive UDP ports on 127.0.0.1 that are free right now."""
    for _ in range(200):
        # Below Linux's ephemeral range (32768+), where other programs' sockets land.
        first = random.randint(20_000, 32_000 - size)
        socks = []
        try:
            for port in range(first, first + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first, first + size - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port range")


def candidates(sdp: str) -> list[tuple[str, int, str]]:
    """``(address, port, type)`` of every ``a=candidate`` line."""
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            bits = line.split()
            out.append((bits[4], int(bits[5]), bits[7]))
    return out


def server_ports(server: RunningServer) -> list[int]:
    """The UDP ports the server's peers have bound, read from their sockets."""
    ports = []
    for call in server.state.calls.values():
        # Bundled: the audio and data sections share one ICE gatherer.
        gatherers = {id(g): g for g in call.pc._ice_gatherers()}.values()
        for gatherer in gatherers:
            for protocol in gatherer._connection._protocols:
                ports.append(protocol.transport.get_extra_info("socket").getsockname()[1])
    return ports


class Caller:
    """A real aiortc caller: silence on an audio track and the events channel."""

    def __init__(self) -> None:
        from aiortc.mediastreams import AudioStreamTrack

        self.pc = RTCPeerConnection(rtc_configuration(WebRTCConfig()))
        self.pc.addTrack(AudioStreamTrack())
        self.channel = self.pc.createDataChannel("oai-events")
        self.first_event: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self.channel.on("message", self._message)
        self.answer = ""

    def _message(self, raw: str | bytes) -> None:
        if not self.first_event.done():
            self.first_event.set_result(json.loads(raw))

    async def offer(self, http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        async with http.post(f"{url}/api/offer", json=body) as r:
            reply: dict[str, Any] = await r.json()
            if r.status == 200:
                self.answer = reply["sdp"]
                await self.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
            return r.status, {**reply, "retry_after": r.headers.get("Retry-After")}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def serve(**env: str) -> RunningServer:
    return await start_server(make_config(VAD__KIND="energy", **env), engine=Echo())


async def test_every_server_port_is_in_the_range_and_calls_connect(
    http: aiohttp.ClientSession,
) -> None:
    first, last = free_range(4)
    server = await serve(WEBRTC__UDP_PORTS=f"[{first}, {last}]")
    callers = [Caller() for _ in range(3)]
    try:
        for caller in callers:
            status, reply = await caller.offer(http, server.url)
            assert status == 200, reply
            event = await asyncio.wait_for(caller.first_event, 20)
            assert event["type"] in ("session.created", "transcription_session.created"), event
            found = set(candidates(caller.answer))  # each media section lists them
            assert found and all(first <= port <= last for _, port, _ in found), found
            assert {addr for addr, _, _ in found} == {"127.0.0.1"}, found
        ports = server_ports(server)
        assert len(ports) == 3 and len(set(ports)) == 3, ports  # one socket per call (bundle)
        assert all(first <= p <= last for p in ports), (ports, first, last)
    finally:
        for caller in callers:
            await caller.pc.close()
        await server.stop()


async def test_a_full_range_refuses_the_offer_with_503(http: aiohttp.ClientSession) -> None:
    first, last = free_range(2)
    server = await serve(WEBRTC__UDP_PORTS=f"[{first}, {last}]")
    callers = [Caller() for _ in range(4)]
    try:
        first_call = ""
        for caller in callers[:2]:
            status, reply = await caller.offer(http, server.url)
            assert status == 200, reply
            first_call = first_call or reply["pc_id"]
        status, reply = await callers[2].offer(http, server.url)
        assert status == 503, reply
        assert reply["error"]["code"] == "too_many_calls", reply
        assert f"[{first}, {last}]" in reply["error"]["message"], reply
        assert reply["retry_after"] == "10"
        assert len(server.state.calls) == 2  # the refused call left nothing behind

        # A call that ends gives its port back; the next offer gets it.
        await server.state.calls[first_call].close("test")
        status, reply = await callers[3].offer(http, server.url)
        assert status == 200, reply
        assert sorted(server_ports(server)) == [first, last]
    finally:
        for caller in callers:
            await caller.pc.close()
        await server.stop()


async def test_a_range_taken_by_another_program_refuses_the_offer(
    http: aiohttp.ClientSession,
) -> None:
    first, last = free_range(1)
    server = await serve(WEBRTC__UDP_PORTS=f"[{first}, {last}]")
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", first))
    caller = Caller()
    try:
        status, reply = await caller.offer(http, server.url)
        assert (status, reply["error"]["code"]) == (503, "too_many_calls"), reply
    finally:
        squatter.close()
        await caller.pc.close()
        await server.stop()


async def test_public_address_is_announced_with_the_bound_port(
    http: aiohttp.ClientSession,
) -> None:
    first, last = free_range(2)
    server = await serve(WEBRTC__UDP_PORTS=f"[{first}, {last}]", WEBRTC__PUBLIC_ADDRESS=PUBLIC)
    caller = Caller()
    try:
        status, reply = await caller.offer(http, server.url)
        assert status == 200, reply
        found = sorted(set(candidates(caller.answer)))
        assert [(addr, kind) for addr, _, kind in found] == [(PUBLIC, "host")], found
        assert [port for _, port, _ in found] == server_ports(server)  # the bound port
    finally:
        await caller.pc.close()
        await server.stop()


async def test_mdns_candidates_of_an_offer_are_not_resolved(http: aiohttp.ClientSession) -> None:
    server = await serve()
    caller = Caller()
    try:
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        sdp = caller.pc.localDescription.sdp.replace(
            "a=end-of-candidates",
            "a=candidate:9 1 udp 2122260223 0b1c2d3e-aaaa.local 50123 typ host\r\n"
            "a=end-of-candidates",
        )
        async with http.post(f"{server.url}/api/offer", json={"sdp": sdp, "type": "offer"}) as r:
            assert r.status == 200, await r.text()
        (call,) = server.state.calls.values()
        remote = [
            c.host for g in call.pc._ice_gatherers() for c in g._connection._remote_candidates
        ]
        assert remote and not any(h.endswith(".local") for h in remote), remote
    finally:
        await caller.pc.close()
        await server.stop()


# -- TURN credentials through /api/config ----------------------------------------------------

SECRET = "coturn-static-auth-secret-for-tests"
TURN = '[{urls: ["stun:turn.test:3478"]}, {urls: ["turn:turn.test:3478?transport=udp"]}]'


async def test_api_config_mints_short_lived_turn_credentials(http: aiohttp.ClientSession) -> None:
    server = await serve(
        WEBRTC__ICE_SERVERS=TURN, WEBRTC__TURN_SECRET=SECRET, WEBRTC__TURN_TTL_S="600"
    )
    try:
        answers = []
        for _ in range(2):
            async with http.get(f"{server.url}/api/config") as r:
                assert r.headers["Cache-Control"] == "no-store"
                answers.append((await r.json())["ice_servers"])
        now = time.time()
        for servers in answers:
            stun, turn = servers
            assert stun == {"urls": ["stun:turn.test:3478"]}  # no credentials on STUN
            expiry, _, user = turn["username"].partition(":")
            assert now + 590 <= int(expiry) <= now + 601 and user
            expected = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
            assert base64.b64decode(turn["credential"]) == expected
        assert answers[0][1]["username"] != answers[1][1]["username"]  # one pair per call
        assert SECRET not in json.dumps(answers)
    finally:
        await server.stop()


def test_server_peer_uses_stun_but_not_turn() -> None:
    config = make_config(WEBRTC__ICE_SERVERS=TURN, WEBRTC__TURN_SECRET=SECRET).webrtc
    servers = server_rtc_configuration(config).iceServers or []
    assert [s.urls for s in servers] == [["stun:turn.test:3478"]]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WEBRTC__UDP_PORTS": "[50010, 50000]"},
            "webrtc.udp_ports: must be empty or [first, last]",
        ),
        ({"WEBRTC__UDP_PORTS": "[50000]"}, "webrtc.udp_ports: must be empty or [first, last]"),
        ({"WEBRTC__UDP_PORTS": "[80, 90]"}, "webrtc.udp_ports: must be empty or [first, last]"),
        ({"WEBRTC__PUBLIC_ADDRESS": "vm.example.org"}, "webrtc.public_address: 'vm.example.org'"),
        (
            {"WEBRTC__ICE_SERVERS": '[{urls: ["turn:t.test:3478"]}]'},
            "a TURN server needs a username and credential, or webrtc.turn_secret",
        ),
        (
            {
                "WEBRTC__ICE_SERVERS": '[{urls: ["turn:t.test"], username: u, credential: c}]',
                "WEBRTC__TURN_SECRET": SECRET,
            },
            "leave its username and credential empty",
        ),
        (
            {"WEBRTC__ICE_SERVERS": '[{urls: ["stun:t.test"]}]', "WEBRTC__TURN_SECRET": SECRET},
            "webrtc.turn_secret: is set but webrtc.ice_servers names no turn",
        ),
        ({"SERVER__TLS_KEY_FILE": "/k.pem"}, "server.tls_cert_file: server.tls_cert_file and"),
    ],
)
def test_bad_options_name_their_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        make_config(**env)
    assert message in str(info.value)

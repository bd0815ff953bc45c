"""A real aiortc caller for ``test_nat.py``, run inside the test's "caller" network namespace
(behind its NAT): it does what the page does, and prints what happened as one JSON line.

``--mode call``: wait for ``/readyz`` over https, fetch ``/api/config`` (its ICE servers, TURN
credentials minted for this call), offer audio + the events channel with
``--policy all|relay``, play ``--wav`` and collect the finals until ``--words`` are heard or the
call ends. ``--bad-credential`` spoils the minted TURN password first. The result names the
candidate pair ICE chose (read from aioice, test-only).

``--mode probe``: one TURN allocation per ``--probe USER:CREDENTIAL`` (plus the pair
``/api/config`` mints, as ``minted``), straight at the TURN server: accepted or refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
import time
from typing import Any

import aiohttp
from aioice import turn
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

COMPLETED = "conversation.item.input_audio_transcription.completed"


async def wait_ready(http: aiohttp.ClientSession, base: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        try:
            async with http.get(f"{base}/readyz") as r:
                if r.status == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status}"
        except (aiohttp.ClientError, OSError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.5)
    raise RuntimeError(f"/readyz not 200 after {timeout_s:.0f} s: {last}")


def turn_entry(ice_servers: list[dict[str, Any]]) -> dict[str, Any]:
    return next(s for s in ice_servers if any(u.startswith("turn:") for u in s["urls"]))


def turn_address(entry: dict[str, Any]) -> tuple[str, int]:
    url = next(u for u in entry["urls"] if u.startswith("turn:"))
    host, port = url[len("turn:") :].split("?")[0].rsplit(":", 1)
    return host, int(port)


async def call(args: argparse.Namespace, http: aiohttp.ClientSession, out: dict[str, Any]) -> None:
    async with http.get(f"{args.url}/api/config") as r:
        config = await r.json()
    servers = config["ice_servers"]
    if args.bad_credential:
        turn_entry(servers)["credential"] = "not-the-minted-one"
    out["turn_username"] = turn_entry(servers).get("username")
    policy = RTCIceTransportPolicy.RELAY if args.policy == "relay" else RTCIceTransportPolicy.ALL
    pc = RTCPeerConnection(
        RTCConfiguration(iceServers=[RTCIceServer(**s) for s in servers], iceTransportPolicy=policy)
    )
    player = MediaPlayer(args.wav)
    finals: list[str] = []
    heard = asyncio.Event()
    words = args.words.split()
    try:
        assert player.audio is not None
        pc.addTrack(player.audio)
        channel = pc.createDataChannel(config["data_channel"])

        @channel.on("message")
        def _message(raw: str | bytes) -> None:
            event = json.loads(raw)
            if event.get("type") == COMPLETED:
                finals.append(event["transcript"])
                have = set(re.findall(r"[a-z']+", " ".join(finals).lower()))
                if all(w in have for w in words):
                    heard.set()

        @pc.on("connectionstatechange")
        def _state() -> None:
            out.setdefault("states", []).append(pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                heard.set()

        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        out["offered"] = sorted({line.split()[7] for line in offer.splitlines()
                                 if line.startswith("a=candidate:")})  # fmt: skip
        async with http.post(f"{args.url}/api/offer", json={"sdp": offer, "type": "offer"}) as r:
            answer = await r.json()
            out["offer_status"] = r.status
        if r.status != 200:
            out["answer"] = answer
            return
        out["answered"] = sorted(
            {f"{b[7]} {b[4]}:{b[5]}" for b in map(str.split, answer["sdp"].splitlines())
             if b and b[0].startswith("a=candidate:")}
        )  # fmt: skip
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        try:
            await asyncio.wait_for(heard.wait(), args.timeout_s)
        except TimeoutError:
            out["timed_out"] = True
        out["connected"] = "connected" in out.get("states", [])
        if pc.sctp is not None:
            pair = pc.sctp.transport.transport._connection._nominated.get(1)
            if pair is not None:
                local, remote = pair.local_candidate, pair.remote_candidate
                out["pair"] = {
                    "local": [local.type, local.host, local.port],
                    "remote": [remote.type, remote.host, remote.port],
                }
    finally:
        out["finals"] = finals
        await pc.close()


async def allocate(server: tuple[str, int], username: str, credential: str) -> dict[str, Any]:
    """One TURN allocation: the relayed address, or the error coturn answered."""
    try:
        transport, _ = await asyncio.wait_for(
            turn.create_turn_endpoint(
                asyncio.DatagramProtocol, server_addr=server, username=username, password=credential
            ),
            10,
        )
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    relayed = transport.get_extra_info("sockname")
    transport.close()
    return {"ok": True, "relayed": list(relayed)}


async def probe(args: argparse.Namespace, http: aiohttp.ClientSession, out: dict[str, Any]) -> None:
    async with http.get(f"{args.url}/api/config") as r:
        entry = turn_entry((await r.json())["ice_servers"])
    server = turn_address(entry)
    out["minted"] = await allocate(server, entry["username"], entry["credential"])
    for i, pair in enumerate(args.probe):
        user, _, credential = pair.rpartition(":")
        out[f"probe{i}"] = await allocate(server, user, credential)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="https://<server's public address>:<port>")
    parser.add_argument("--ca", required=True, help="the test certificate, trusted as a CA")
    parser.add_argument("--mode", choices=["call", "probe"], default="call")
    parser.add_argument("--policy", choices=["all", "relay"], default="all")
    parser.add_argument("--wav", default="")
    parser.add_argument("--words", default="")
    parser.add_argument("--bad-credential", action="store_true")
    parser.add_argument("--probe", action="append", default=[], help="USER:CREDENTIAL")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--ready-timeout-s", type=float, default=90.0)
    args = parser.parse_args()
    out: dict[str, Any] = {"ok": False}
    tls = ssl.create_default_context(cafile=args.ca)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
            out["ready_s"] = round(await wait_ready(http, args.url, args.ready_timeout_s), 2)
            await (call if args.mode == "call" else probe)(args, http, out)
        out["ok"] = True
    except Exception as exc:  # reported in the JSON line, for the test to show
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

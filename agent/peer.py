"""WebRTC quirks of aiortc/aioice, handled in one place, each with its reason.

Nothing else in the project touches aioice internals or builds an ``RTCConfiguration``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer

from agent.config import WebRTCConfig

log = logging.getLogger(__name__)

_original_get_host_addresses = aioice.ice.get_host_addresses


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Gather ICE host candidates only on ``addresses`` (empty: every interface).

    aioice reads the machine's interfaces and always leaves 127.0.0.1 out, so a loopback-only
    test (or a network namespace with only ``lo``) gathers nothing; and a server with several
    interfaces may need to offer just its public or NAT 1:1 address. aioice exposes no option
    for this, so its module-level lookup is replaced, process-wide, by a fixed list.
    """
    chosen = list(addresses)
    if not chosen:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return

    def _chosen(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = _chosen


def rtc_configuration(config: WebRTCConfig) -> RTCConfiguration:
    """The peer configuration with the configured STUN/TURN servers.

    An explicit empty list matters: given ``None``, aiortc falls back to Google's public STUN
    server, which would send traffic off the machine without the operator asking for it.
    """
    servers = [
        RTCIceServer(
            urls=list(s.urls), username=s.username or None, credential=s.credential or None
        )
        for s in config.ice_servers
    ]
    return RTCConfiguration(iceServers=servers)


def new_peer_connection(config: WebRTCConfig) -> RTCPeerConnection:
    return RTCPeerConnection(configuration=rtc_configuration(config))


def set_audio_jitter_prefetch(pc: RTCPeerConnection, frames: int) -> None:
    """Release each received audio frame once ``frames`` newer ones have arrived.

    aiortc's audio receiver uses a jitter buffer with ``prefetch=4``: every 20 ms frame waits
    for four newer frames, a fixed 80 ms before the server hears anything (measured by
    bench/latency.py). Reordering is handled by sequence number whatever the prefetch, so a
    small value only costs robustness to bursts of late packets. aiortc has no option for it:
    the receiver's private buffer is replaced, once, right after the offer created it and
    before any packet arrived.
    """
    for receiver in pc.getReceivers():
        if getattr(receiver, "_RTCRtpReceiver__kind", None) != "audio":
            continue
        if not hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            raise RuntimeError("aiortc changed: no audio jitter buffer on the receiver")
        receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=16, prefetch=frames)


def ice_servers_for_browser(config: WebRTCConfig) -> list[dict[str, object]]:
    """The ``iceServers`` list the page passes to ``new RTCPeerConnection``."""
    out: list[dict[str, object]] = []
    for s in config.ice_servers:
        entry: dict[str, object] = {"urls": list(s.urls)}
        if s.username:
            entry["username"] = s.username
        if s.credential:
            entry["credential"] = s.credential
        out.append(entry)
    return out


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer, even one aiortc left half-built.

    An offer whose BUNDLE group names a missing mid leaves aiortc transceivers without a
    transport; ``pc.close()`` then raises half-way and, having marked itself closing, hangs
    every later call. So it is called once, and on failure the transports it did not reach
    are stopped here (each releases its UDP sockets).
    """
    try:
        await pc.close()
    except Exception as exc:
        log.warning("aiortc could not close a half-negotiated peer (%r): stopping its parts", exc)
        transports = [t.receiver.transport for t in pc.getTransceivers()]
        if pc.sctp is not None:
            transports.append(pc.sctp.transport)
        for dtls in transports:
            if dtls is None:
                continue
            for part in (dtls, dtls.transport):
                with contextlib.suppress(Exception):
                    await part.stop()

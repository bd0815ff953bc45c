"""WebRTC quirks of aiortc/aioice, handled in one place, each with its reason.

Nothing else in the project touches aioice internals or builds an ``RTCConfiguration``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame

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


class ImmediateAudioJitterBuffer(JitterBuffer):
    """Hands each audio frame on as soon as it is next in sequence.

    An Opus RTP packet is one whole frame, so there is nothing to wait for. aiortc's buffer
    only completes a frame when a packet of the *next* timestamp arrives (+20 ms) and then
    holds ``prefetch`` more (4 for audio: +80 ms in all, measured by bench/latency.py). Order
    is kept all the same: a packet that comes early waits in its slot for the one before it,
    and ``add`` drops one older than the origin.
    """

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None
        packet = self._packets[self._origin % self._capacity]
        if packet is None:
            return None  # the next frame in sequence has not arrived yet
        self.remove(1)
        # ``_data`` is the depacketised payload the receiver stored, as aiortc itself uses.
        data: bytes = packet._data  # type: ignore[attr-defined]
        return JitterFrame(data=data, timestamp=packet.timestamp)


def set_audio_jitter_prefetch(pc: RTCPeerConnection, frames: int) -> None:
    """Set how many newer frames a received audio frame waits for (0: none at all).

    aiortc has no option for it: the audio receiver's private buffer is replaced, once,
    right after the offer created the receiver and before any packet arrived.
    """
    for receiver in pc.getReceivers():
        if getattr(receiver, "_RTCRtpReceiver__kind", None) != "audio":
            continue
        if not hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            raise RuntimeError("aiortc changed: no audio jitter buffer on the receiver")
        buffer = (
            ImmediateAudioJitterBuffer(capacity=16)
            if frames == 0
            else JitterBuffer(capacity=16, prefetch=frames)
        )
        receiver._RTCRtpReceiver__jitter_buffer = buffer


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

"""WebRTC quirks of aiortc/aioice, handled in one place, each with its reason.

Nothing else in the project touches aioice internals or builds an ``RTCConfiguration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aioice.ice
import aioice.turn
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSctpCapabilities,
    RTCSctpTransport,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    DataChunk,
    InboundStream,
    tsn_plus_one,
)

from agent.config import WebRTCConfig
from agent.errors import VoxtralRtcError
from agent.events import MAX_CLIENT_MESSAGE

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
    """A client peer's configuration with the configured STUN/TURN servers.

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


def server_rtc_configuration(config: WebRTCConfig) -> RTCConfiguration:
    """The server peer's configuration: the STUN URLs of ``webrtc.ice_servers`` only.

    TURN entries are for callers (``/api/config``). A relay of the server's own would be
    one more allocation per call, from a UDP socket aioice binds on a port outside
    ``webrtc.udp_ports``; a caller's relay already reaches the server's host candidates.
    """
    stun = [u for s in config.ice_servers for u in s.urls if u.startswith("stun:")]
    return RTCConfiguration(iceServers=[RTCIceServer(urls=stun)] if stun else [])


class UdpPortsExhausted(VoxtralRtcError):
    """Every port of ``webrtc.udp_ports`` is taken: the call is refused while it is offered."""

    code = "too_many_calls"


@dataclass(frozen=True)
class HostSockets:
    """Where a server peer's ICE host candidates live: the ports and the announced address."""

    #: Inclusive ``(first, last)``, or ``None`` for any port the system picks.
    ports: tuple[int, int] | None = None
    #: Announced in place of the bound address (1:1 NAT); empty: the bound address itself.
    public_address: str = ""

    @classmethod
    def from_config(cls, config: WebRTCConfig) -> HostSockets:
        first_last = (config.udp_ports[0], config.udp_ports[1]) if config.udp_ports else None
        return cls(first_last, config.public_address)

    @property
    def custom(self) -> bool:
        return self.ports is not None or bool(self.public_address)

    def bind(self, address: str) -> socket.socket:
        """A UDP socket on ``address`` and a free port of the range (any port without one).

        The range is tried from a random port on, so a port a call just released is rarely
        the next call's. ``UdpPortsExhausted`` when no port of the range is free.
        """
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        if self.ports is None:
            candidates: Sequence[int] = [0]
        else:
            first, last = self.ports
            start = random.randint(first, last)
            candidates = [*range(start, last + 1), *range(first, start)]
        for port in candidates:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if self.ports is not None and exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            sock.setblocking(False)
            return sock
        assert self.ports is not None
        raise UdpPortsExhausted(
            f"every UDP port of webrtc.udp_ports {list(self.ports)} on {address} is in use"
        )

    def announced(self, bound: str) -> str:
        """The address a host candidate on ``bound`` names: the public one of its family."""
        if self.public_address and (":" in self.public_address) == (":" in bound):
            return self.public_address
        return bound


async def _host_candidates(
    connection: aioice.ice.Connection,
    sockets: HostSockets,
    component: int,
    addresses: list[str],
    timeout: int = 5,
) -> list[Candidate]:
    """aioice's ``Connection.get_component_candidates`` with our own sockets.

    aioice (0.13) binds each host candidate to port 0 and names the bound address: no port
    range, no 1:1 NAT address. Same steps, same candidates otherwise: a host candidate per
    address (an address that cannot be bound is skipped, as aioice does), and a
    server-reflexive one per IPv4 host socket when a STUN server is configured. No TURN: the
    server peer is never given one (``server_rtc_configuration``).
    """
    bound: list[socket.socket] = []
    try:
        for address in addresses:
            try:
                bound.append(sockets.bind(address))
            except OSError as exc:  # UdpPortsExhausted is not one: it refuses the call
                log.info("cannot bind an ICE socket on %s: %s", address, exc)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    loop = asyncio.get_running_loop()
    protocols: list[aioice.ice.StunProtocol] = []
    candidates: list[Candidate] = []
    for sock in bound:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice.turn.UDP_SOCKET_BUFFER_SIZE)
        host, port = sock.getsockname()[:2]
        _, protocol = await loop.create_datagram_endpoint(
            lambda: aioice.ice.StunProtocol(connection), sock=sock
        )
        announced = sockets.announced(host)
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", announced),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=announced,
            port=port,
            type="host",
        )
        protocols.append(protocol)
        candidates.append(protocol.local_candidate)
    # Registered at once, as aioice does: closing the connection closes them.
    connection._protocols += protocols
    stun_server = connection.stun_server
    if stun_server is not None:
        tasks = [
            asyncio.create_task(aioice.ice.server_reflexive_candidate(p, stun_server))
            for p in protocols
            if ":" not in p.local_candidate.host
        ]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            candidates += [t.result()[0] for t in done if t.exception() is None]
    return candidates


def _gather_with(connection: aioice.ice.Connection, sockets: HostSockets) -> None:
    """Make ``connection`` gather its host candidates through ``sockets`` (once)."""

    async def gather(component: int, addresses: list[str], timeout: int = 5) -> list[Candidate]:
        return await _host_candidates(connection, sockets, component, addresses, timeout)

    if not getattr(connection, "_voxtral_sockets", False):
        connection._voxtral_sockets = True  # type: ignore[attr-defined]
        connection.get_component_candidates = gather  # type: ignore[method-assign]


def _without_mdns_candidates(sdp: str) -> str:
    """The offer without ``a=candidate`` lines naming a ``.local`` host.

    aioice resolves an mDNS candidate by multicasting on the server's LAN from port 5353
    (outside ``webrtc.udp_ports``), on the caller's say-so; trickled ones are refused for the
    same reason (``routes._candidate``). A browser that has microphone access offers its
    addresses anyway.
    """
    lines = sdp.split("\r\n") if "\r\n" in sdp else sdp.split("\n")
    sep = "\r\n" if "\r\n" in sdp else "\n"
    kept = [
        line
        for line in lines
        if not (
            line.startswith("a=candidate:")
            and len(line.split()) > 4
            and line.split()[4].lower().endswith(".local")
        )
    ]
    return sep.join(kept)


def new_peer_connection(config: WebRTCConfig) -> RTCPeerConnection:
    return ServerPeerConnection(
        configuration=server_rtc_configuration(config), sockets=HostSockets.from_config(config)
    )


#: Largest data-channel message a peer may send us: advertised in the SDP answer
#: (``a=max-message-size``) and enforced while SCTP reassembles; no client event is larger.
MAX_MESSAGE_BYTES = MAX_CLIENT_MESSAGE
#: Most fragments of one message: 64 KiB in fragments of at least 64 bytes (browsers and
#: aiortc cut ~1.1 KiB); each costs ~200 bytes of Python whatever its payload.
MAX_MESSAGE_FRAGMENTS = 1024
#: Most unfinished data all streams of one association may hold: the receive window aiortc
#: advertises (1 MiB), which a compliant sender never has outstanding at once; legitimately
#: more than one message is held only while a lost packet is resent.
MAX_HELD_BYTES = 1 << 20
MAX_HELD_FRAGMENTS = 4096
#: Emitted (no arguments) by a ``ServerPeerConnection`` whose peer sent past those limits.
MESSAGE_TOO_LARGE = "message_too_large"


class ServerPeerConnection(RTCPeerConnection):
    """The server's peer: its SCTP reassembly is bounded by ``MAX_MESSAGE_BYTES``, and its
    ICE host candidates use ``sockets`` (port range, announced address).

    aiortc creates the SCTP transport while it applies the offer: the bound goes in right
    after, before any data arrives and before the answer (which then advertises it) is made.
    Candidates are gathered while the answer is set as the local description: the ICE
    connections get our sockets just before.
    """

    def __init__(
        self, configuration: RTCConfiguration | None = None, sockets: HostSockets | None = None
    ) -> None:
        super().__init__(configuration=configuration)
        self._sockets = sockets or HostSockets()

    async def setRemoteDescription(self, sessionDescription: RTCSessionDescription) -> None:
        offer = RTCSessionDescription(
            sdp=_without_mdns_candidates(sessionDescription.sdp), type=sessionDescription.type
        )
        await super().setRemoteDescription(offer)
        if self.sctp is not None:
            bound_inbound_messages(self.sctp, MAX_MESSAGE_BYTES, self._message_too_large)

    async def setLocalDescription(
        self, sessionDescription: RTCSessionDescription | None = None
    ) -> None:
        if self._sockets.custom:
            for gatherer in self._ice_gatherers():
                _gather_with(gatherer._connection, self._sockets)
        await super().setLocalDescription(sessionDescription)

    def _ice_gatherers(self) -> list[Any]:
        dtls = [t.receiver.transport for t in self.getTransceivers()]
        if self.sctp is not None:
            dtls.append(self.sctp.transport)
        return [d.transport.iceGatherer for d in dtls if d is not None]

    def _message_too_large(self) -> None:
        self.emit(MESSAGE_TOO_LARGE)


def _continues(prev: DataChunk, chunk: DataChunk) -> bool:
    """Whether ``chunk`` is the fragment right after ``prev`` in the same message."""
    return (
        chunk.tsn == tsn_plus_one(prev.tsn)
        and not prev.flags & SCTP_DATA_LAST_FRAG
        and not chunk.flags & SCTP_DATA_FIRST_FRAG
    )


class _InboundBudget:
    """What all inbound streams of one SCTP association hold, and what happens past it."""

    def __init__(self, max_message: int, on_overflow: Callable[[], None]) -> None:
        self.max_message = max_message
        self.on_overflow = on_overflow
        self.streams: list[_BoundedInboundStream] = []
        self.held_bytes = 0
        self.held_fragments = 0
        self.overflowed = False

    def check(self, message_bytes: int, message_fragments: int) -> None:
        """Overflow if one message (as far as it has come) or everything held is too much."""
        if message_bytes > self.max_message or message_fragments > MAX_MESSAGE_FRAGMENTS:
            what = f"a message past {self.max_message} bytes ({message_fragments} fragments)"
        elif self.held_bytes > MAX_HELD_BYTES or self.held_fragments > MAX_HELD_FRAGMENTS:
            what = f"{self.held_bytes} bytes in {self.held_fragments} unfinished fragments"
        else:
            return
        log.warning("the peer sent %s on its data channels: its data is no longer read", what)
        self.overflowed = True
        for stream in self.streams:
            stream.reassembly = []  # released now, not when the call is over
        self.held_bytes = self.held_fragments = 0
        self.on_overflow()


class _BoundedInboundStream(InboundStream):
    """aiortc's reassembly, measuring each message as its fragments arrive.

    A message is measured by the run of its consecutive fragments held (the whole message
    once it is complete): kept up to date in O(1) while fragments arrive in order, walked
    again only around a fragment that arrives out of order.
    """

    def __init__(self, budget: _InboundBudget) -> None:
        super().__init__()
        self._budget = budget
        self._counted = 0  # our fragments in ``budget.held_fragments``
        self._tail = (0, 0)  # bytes and fragments of the run that ends ``reassembly``
        budget.streams.append(self)

    def _recount(self) -> None:
        held = len(self.reassembly)
        self._budget.held_fragments += held - self._counted
        self._counted = held

    def _run(self, pos: int) -> tuple[int, int]:
        """Bytes and fragments of the run of one message's fragments through ``pos``."""
        chunks = self.reassembly
        lo = hi = pos
        while lo > 0 and _continues(chunks[lo - 1], chunks[lo]):
            lo -= 1
        while hi + 1 < len(chunks) and _continues(chunks[hi], chunks[hi + 1]):
            hi += 1
        return sum(len(c.user_data) for c in chunks[lo : hi + 1]), hi - lo + 1

    def _measure_tail(self) -> None:
        self._tail = self._run(len(self.reassembly) - 1) if self.reassembly else (0, 0)

    def add_chunk(self, chunk: DataChunk) -> None:
        if self._budget.overflowed:
            # Dropped unread; aiortc still takes it off the receive window it advertises,
            # which soon reaches 0 and tells a well-behaved sender to stop.
            return
        last = self.reassembly[-1] if self.reassembly else None
        super().add_chunk(chunk)
        size = len(chunk.user_data)
        self._budget.held_bytes += size
        self._recount()
        if self.reassembly[-1] is chunk:  # in order: the common case
            if last is not None and _continues(last, chunk):
                self._tail = (self._tail[0] + size, self._tail[1] + 1)
            else:
                self._tail = (size, 1)
            message = self._tail
        else:
            pos = next(i for i, c in enumerate(self.reassembly) if c is chunk)
            message = self._run(pos)
            self._measure_tail()  # the gap it filled may join runs up to the tail
        self._budget.check(*message)

    def pop_messages(self) -> Iterator[tuple[int, int, bytes]]:
        for message in super().pop_messages():
            self._budget.held_bytes -= len(message[2])  # the fragments' payloads, joined
            self._recount()
            self._measure_tail()
            yield message

    def prune_chunks(self, tsn: int) -> int:
        size = super().prune_chunks(tsn)
        self._budget.held_bytes -= size
        self._recount()
        self._measure_tail()
        return size


def bound_inbound_messages(
    sctp: RTCSctpTransport, max_message: int, on_overflow: Callable[[], None]
) -> None:
    """Refuse data-channel messages over ``max_message`` bytes while they are reassembled.

    aiortc (1.16) reassembles every message whole, whatever its size, before it hands it to
    the channel (``InboundStream.add_chunk``/``pop_messages``, called from
    ``_receive_data_chunk`` for any stream id), and advertises 256 KiB: a peer that ignores
    ``a=max-message-size`` made the server hold 4 MiB (any size) per message, on as many
    streams as it liked. Here each stream the transport creates measures its messages as
    fragments arrive, and all of them share the limits above. Past a limit everything held
    is released, the peer's data is no longer read and ``on_overflow`` runs (the call ends:
    a compliant peer never sends this, and dropping just one message while keeping the
    stream's order would need a second reassembly). The SDP answer advertises
    ``max_message``. Installed once per transport (a renegotiation keeps it).
    """
    if isinstance(getattr(sctp, "_voxtral_budget", None), _InboundBudget):
        return
    streams = getattr(sctp, "_inbound_streams", None)
    if not isinstance(streams, dict) or not hasattr(sctp, "_get_inbound_stream"):
        raise RuntimeError("aiortc changed: no inbound streams on the SCTP transport")
    if streams:
        raise RuntimeError("SCTP data arrived before its reassembly was bounded")
    budget = _InboundBudget(max_message, on_overflow)

    def get_inbound_stream(stream_id: int) -> InboundStream:
        if stream_id not in streams:
            streams[stream_id] = _BoundedInboundStream(budget)
        stream: InboundStream = streams[stream_id]
        return stream

    def capabilities() -> RTCSctpCapabilities:
        return RTCSctpCapabilities(maxMessageSize=max_message)

    sctp._voxtral_budget = budget  # type: ignore[attr-defined]
    sctp._get_inbound_stream = get_inbound_stream  # type: ignore[method-assign]
    sctp.getCapabilities = capabilities  # type: ignore[method-assign]


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

"""WebRTC quirks of aiortc/aioice, handled in one place, each with its reason.

Nothing else in the project touches aioice internals or builds an ``RTCConfiguration``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import aioice.ice
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
    return ServerPeerConnection(configuration=rtc_configuration(config))


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
    """The server's peer: its SCTP reassembly is bounded by ``MAX_MESSAGE_BYTES``.

    aiortc creates the SCTP transport while it applies the offer: the bound goes in right
    after, before any data arrives and before the answer (which then advertises it) is made.
    """

    async def setRemoteDescription(self, sessionDescription: RTCSessionDescription) -> None:
        await super().setRemoteDescription(sessionDescription)
        if self.sctp is not None:
            bound_inbound_messages(self.sctp, MAX_MESSAGE_BYTES, self._message_too_large)

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

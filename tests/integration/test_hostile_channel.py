"""Hostile JSON and a hostile data channel: deeply nested JSON on every JSON route and on the
channel, error events that would echo what the client sent, a client whose SCTP stops
acknowledging (so the server's send buffer only grows), and a data-channel message far past
the advertised ``a=max-message-size``. Real aiortc peers, 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    DataChunk,
    InboundStream,
)

from agent.events import ECHO_MAX_CHARS, ERROR_MESSAGE_MAX_CHARS
from agent.session import CHANNEL_BUFFER_HARD_FACTOR
from agent.transports.webrtc import WebRtcCall
from agent.transports.webrtc_peer import (
    MAX_HELD_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_FRAGMENTS,
    bound_inbound_messages,
)
from signaling.app import RunningServer, start_server
from tests.conftest import make_config
from tests.integration.test_robustness import Echo, offer_body, tone, wait_for
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

COMPLETED = "conversation.item.input_audio_transcription.completed"
#: 200 KB of ``[``: under ``server.max_body_bytes``, far past any sane nesting.
DEEP_HTTP = b"[" * 200_000
#: The same on the channel, under the 64 KiB message limit.
DEEP_CHANNEL = "[" * 60_000


def session_of(server: RunningServer, client: RealtimeClient) -> WebRtcCall:
    assert client.pc_id is not None
    session: WebRtcCall = server.state.calls[client.pc_id]
    return session


async def next_error(client: RealtimeClient, code: str, timeout: float = 10) -> dict[str, Any]:
    while True:
        ev = await client.next_event("error", timeout=timeout)
        if ev.event["error"]["code"] == code:
            return dict(ev.event["error"])


# -- deep JSON ------------------------------------------------------------------------------


async def test_deeply_nested_json_is_a_400_on_every_json_route(
    echo_server: RunningServer,
) -> None:
    pc, body = await offer_body()
    try:
        async with aiohttp.ClientSession() as http:
            # A live call, so that PATCH reaches the parser whatever it checks first.
            async with http.post(f"{echo_server.url}/api/offer", json=body) as resp:
                assert resp.status == 200
            headers = {"Content-Type": "application/json"}
            for method, path in [
                ("POST", "/api/offer"),
                ("PATCH", "/api/offer"),
                ("POST", "/v1/audio/transcriptions"),
            ]:
                async with http.request(
                    method, f"{echo_server.url}{path}", data=DEEP_HTTP, headers=headers
                ) as resp:
                    answer = await resp.json()
                    assert resp.status == 400, (method, path, resp.status, answer)
                    assert answer["error"]["code"] == "invalid_json", (method, path, answer)
            async with http.get(f"{echo_server.url}/healthz") as resp:
                assert resp.status == 200
    finally:
        await pc.close()


async def test_deeply_nested_json_on_the_channel_is_an_error_and_the_call_goes_on(
    echo_server: RunningServer,
) -> None:
    audio = np.concatenate([np.zeros(16000, np.float32), tone(1.0), np.zeros(16000, np.float32)])
    async with RealtimeClient(echo_server.url) as client:
        await client.connect(ArrayAudioTrack(audio))
        client.send_raw(DEEP_CHANNEL)
        client.send_raw('{"type": "session.update", "session": ' + '{"a": ' * 5_000)
        assert client.channel is not None
        client.channel.send(DEEP_CHANNEL.encode())  # binary too
        for _ in range(3):
            error = await next_error(client, "invalid_json")
            assert len(error["message"]) <= ERROR_MESSAGE_MAX_CHARS
        # The call is alive: it still applies an update and still transcribes speech.
        client.send({"type": "session.update", "session": {"include_interim": False}})
        await client.next_event("session.updated", timeout=5)
        completed = await client.next_event(COMPLETED, timeout=15)
        assert completed.event["transcript"].startswith("heard")
        assert client.pc_id in echo_server.state.calls


# -- error echoes ---------------------------------------------------------------------------


async def test_error_events_echo_at_most_a_short_prefix_of_the_input(
    echo_server: RunningServer,
) -> None:
    long = "x" * 60_000
    async with RealtimeClient(echo_server.url) as client:
        await client.connect(ArrayAudioTrack(np.zeros(16000 * 10, np.float32)))
        client.send({"type": long})
        error = await next_error(client, "unknown_event_type")
        assert len(error["message"]) < 2 * ECHO_MAX_CHARS and "…" in error["message"]
        client.send({"type": "input_audio_buffer.commit", "event_id": long})
        error = await next_error(client, "input_audio_buffer_commit_empty")
        assert len(error["event_id"]) == ECHO_MAX_CHARS and error["event_id"].endswith("…")
        session = {"turn_detection": {"type": long}}
        client.send({"type": "session.update", "session": session})
        error = await next_error(client, "invalid_value")
        assert len(error["message"]) < 2 * ECHO_MAX_CHARS + 40
        for raw in client.received:
            assert len(json.dumps(raw.event)) < 1_000


# -- a client that does not read ------------------------------------------------------------


async def test_a_client_that_stops_acknowledging_cannot_grow_the_server_buffer() -> None:
    soft = 16_384
    config = make_config(VAD__KIND="energy", LIMITS__CHANNEL_BUFFER_BYTES=str(soft))
    server = await start_server(config, engine=Echo())
    try:
        async with RealtimeClient(server.url) as client:
            await client.connect(ArrayAudioTrack(np.zeros(16000 * 60, np.float32)))
            await client.next_event("session.created", timeout=5)
            session = session_of(server, client)
            await wait_for(lambda: session._channel is not None, 5)
            channel = session._channel
            assert channel is not None

            # Every byte the server's channel buffers, at its highest.
            peak = 0
            add = channel._addBufferedAmount

            def counted(amount: int) -> None:
                nonlocal peak
                add(amount)
                peak = max(peak, channel.bufferedAmount)

            channel._addBufferedAmount = counted  # type: ignore[method-assign]

            # The client's SCTP now drops every DATA chunk unread, so it never sends a SACK:
            # whatever the server sends stays in its buffers.
            sctp = client.pc.sctp
            assert sctp is not None

            async def deaf(chunk: DataChunk) -> None:
                return None

            sctp._receive_data_chunk = deaf  # type: ignore[method-assign]

            # Each of these made a 60 KB error event, never dropped.
            for i in range(20):
                client.send({"type": f"{i}" + "y" * 60_000})
                await asyncio.sleep(0.01)
            # Then events that are never dropped: session.updated, ~1.5 KB each.
            prompt = "p" * 1_000
            update = {
                "type": "session.update",
                "session": {"input_audio_transcription": {"prompt": prompt}},
            }
            for _ in range(400):
                if session.closed or session.end_reason:
                    break
                client.send(update)
                await asyncio.sleep(0.005)
            await wait_for(lambda: session.closed, 10)
            assert session.end_reason == "client_not_reading"
            assert peak <= CHANNEL_BUFFER_HARD_FACTOR * soft + 4_096, peak
            assert session.dropped_events > 0
    finally:
        await server.stop()


# -- a message past max-message-size --------------------------------------------------------


async def test_an_oversized_message_is_refused_while_it_is_reassembled(
    echo_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The most any SCTP inbound stream (the server's above all) held while reassembling.
    peak = 0
    add_chunk = InboundStream.add_chunk

    def measured(self: InboundStream, chunk: DataChunk) -> None:
        nonlocal peak
        add_chunk(self, chunk)
        peak = max(peak, sum(len(c.user_data) for c in self.reassembly))

    monkeypatch.setattr(InboundStream, "add_chunk", measured)

    async with RealtimeClient(echo_server.url) as client:
        await client.connect(ArrayAudioTrack(np.zeros(16000 * 30, np.float32)))
        sctp = client.pc.sctp
        assert sctp is not None
        # The answer advertises the limit the server enforces (aiortc's own is 256 KiB).
        assert sctp._remote_max_message_size == MAX_MESSAGE_BYTES
        session = session_of(echo_server, client)
        # A compliant sender refuses to send past it: this one does not care.
        sctp._remote_max_message_size = 0
        client.send_raw('{"type": "' + "z" * (4 << 20) + '"}')
        error = await next_error(client, "message_too_large", timeout=30)
        assert str(MAX_MESSAGE_BYTES) in error["message"]
        await wait_for(lambda: session.closed, 15)
        assert session.end_reason == "message_too_large"
    assert peak <= MAX_MESSAGE_BYTES + 2_048, peak


# -- the bounded reassembly alone, with scripted DATA chunks --------------------------------


class Reassembly:
    """``bound_inbound_messages`` on a stand-in transport, fed as ``_receive_data_chunk`` does."""

    def __init__(self) -> None:
        self.sctp: Any = SimpleNamespace(
            _inbound_streams={}, _get_inbound_stream=None, getCapabilities=None
        )
        self.overflows = 0
        bound_inbound_messages(self.sctp, MAX_MESSAGE_BYTES, self._overflow)
        self.delivered: list[bytes] = []
        self.peak = 0

    def _overflow(self) -> None:
        self.overflows += 1

    def receive(self, chunks: Iterable[DataChunk]) -> None:
        for chunk in chunks:
            # What is held once the chunk is in, before the bound may release it all.
            self.peak = max(self.peak, self.held + len(chunk.user_data))
            stream = self.sctp._get_inbound_stream(chunk.stream_id)
            stream.add_chunk(chunk)
            self.delivered += [m[2] for m in stream.pop_messages()]

    @property
    def held(self) -> int:
        return sum(
            len(c.user_data) for s in self.sctp._inbound_streams.values() for c in s.reassembly
        )


def message(tsn: int, size: int, stream_id: int = 0, seq: int = 0, cut: int = 1100) -> list:
    """One message's DATA chunks, ``cut`` bytes of payload each, from TSN ``tsn`` on."""
    payload = bytes([seq % 251]) * size
    chunks = []
    for i, pos in enumerate(range(0, size, cut)):
        chunk = DataChunk()
        chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn + i, stream_id, seq, 51
        chunk.user_data = payload[pos : pos + cut]
        chunk.flags = (SCTP_DATA_FIRST_FRAG if pos == 0 else 0) | (
            SCTP_DATA_LAST_FRAG if pos + cut >= size else 0
        )
        chunks.append(chunk)
    return chunks


def test_messages_up_to_the_limit_pass_even_behind_a_lost_packet() -> None:
    r = Reassembly()
    assert r.sctp.getCapabilities().maxMessageSize == MAX_MESSAGE_BYTES  # the SDP answer's
    first = message(1, MAX_MESSAGE_BYTES, seq=0)
    second = message(1 + len(first), MAX_MESSAGE_BYTES, seq=1)
    lost = first.pop(3)  # resent after everything else arrived
    r.receive([*first, *second, lost])
    assert r.overflows == 0
    assert [len(m) for m in r.delivered] == [MAX_MESSAGE_BYTES] * 2
    assert r.peak > MAX_MESSAGE_BYTES  # both were held at once, legitimately
    assert r.held == 0 and r.sctp._voxtral_budget.held_fragments == 0


def test_a_message_past_the_limit_is_dropped_as_it_arrives() -> None:
    r = Reassembly()
    r.receive(message(1, 4 << 20))
    assert r.overflows == 1 and not r.delivered
    assert r.peak <= MAX_MESSAGE_BYTES + 1100 and r.held == 0
    r.receive(message(10_000, 100, seq=1))  # nothing more is read once it overflowed
    assert not r.delivered and r.held == 0


def test_a_message_past_the_limit_is_caught_out_of_order_too() -> None:
    r = Reassembly()
    r.receive(reversed(message(1, 4 << 20)))  # its first fragment never comes first
    assert r.overflows == 1 and r.peak <= MAX_MESSAGE_BYTES + 1100


def test_tiny_fragments_are_bounded_by_count() -> None:
    r = Reassembly()
    r.receive(message(1, 4_000, cut=1))
    assert r.overflows == 1 and r.peak == MAX_MESSAGE_FRAGMENTS + 1  # one byte each


def test_unfinished_messages_on_many_streams_are_bounded_together() -> None:
    r = Reassembly()
    tsn = 1
    for stream_id in range(64):
        partial = message(tsn, MAX_MESSAGE_BYTES, stream_id=stream_id)[:-1]  # never finished
        r.receive(partial)
        tsn += len(partial) + 1
        if r.overflows:
            break
    assert r.overflows == 1 and r.peak <= MAX_HELD_BYTES + 1100 and r.held == 0

"""A WebRTC call: an aiortc peer carrying one ``TranscriptionSession``.

The peer's audio track becomes 16 kHz chunks (``webrtc_audio``) on the session's inbound
queue; its ``oai-events`` data channel carries client messages in and events out
(``DataChannelSink``); ``webrtc_peer`` holds every aiortc/aioice quirk. The call owns the
peer: ICE + DTLS set-up is bounded by ``CONNECT_TIMEOUT_S``, and the call ends on end of
track, ``pc.close()``, ICE failure, a closed data channel, no audio for
``audio.idle_timeout_s``, ``limits.max_call_s`` or server shutdown. In every case the
session flushes the open utterance to the engine first, and the peer closes once its last
events have left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from agent import events
from agent.event_sink import EventSink
from agent.session import AudioIn, Carriage, SessionDeps, TranscriptionSession
from agent.transports.webrtc_audio import AudioInput
from agent.transports.webrtc_peer import MAX_MESSAGE_BYTES, MESSAGE_TOO_LARGE, close_peer

log = logging.getLogger(__name__)

#: Longest ICE + DTLS set-up; ``audio.idle_timeout_s`` only counts once media can flow.
CONNECT_TIMEOUT_S = 20.0
#: How the WebRTC transport carries audio: Opus on a media track, no appends.
WEBRTC = Carriage("webrtc", input_format=None, max_message_bytes=events.MAX_CLIENT_MESSAGE)


class DataChannelSink(EventSink):
    """The session's events on the ``oai-events`` data channel."""

    def __init__(self, channel: RTCDataChannel, limit: int) -> None:
        super().__init__(limit)
        self.channel = channel

    def is_open(self) -> bool:
        return bool(self.channel.readyState == "open")

    def _write(self, text: str) -> None:
        self.channel.send(text)

    def buffered_amount(self) -> int:
        return int(self.channel.bufferedAmount)

    async def flush(self, timeout_s: float) -> None:
        # aiortc's pc.close() aborts SCTP at once, dropping what the channel has not handed
        # to SCTP yet: give the last events (a flushed utterance's completed) a moment.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.channel.bufferedAmount > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # the flush task sends the last chunk on a later turn


class WebRtcCall:
    """One peer connection and its session; ``start()`` it, then ``close()`` or let it end."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        deps: SessionDeps,
        on_closed: Callable[[WebRtcCall], None] | None = None,
    ) -> None:
        self.pc = pc
        self._config = deps.config
        self._on_closed = on_closed
        self.session = TranscriptionSession(deps, WEBRTC, stop_input=self._stop_audio)
        self.id = self.session.id
        self._log = logging.LoggerAdapter(log, {"call_id": self.id})
        self._channel: RTCDataChannel | None = None
        self._track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self._audio: AudioInput | None = None
        self._main: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self._peer_closing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Set once the call is on its way out: audio stopping, or the peer closing.
        self._ending = False
        self._stop_requested = False
        self._stop_event = asyncio.Event()
        #: Set once the peer is connected, failed or closed.
        self._peer_settled = asyncio.Event()
        self._wire_peer()

    # -- what the routes and tests see -------------------------------------------------

    @property
    def end_reason(self) -> str | None:
        return self.session.end_reason

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def utterances(self) -> int:
        return self.session.utterances

    @property
    def dropped_events(self) -> int:
        return self.session.dropped_events

    @property
    def heard_ms(self) -> int:
        return self.session.heard_ms

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.session.start()
        self._main = asyncio.create_task(self._run(), name=f"call-{self.id}")

    async def close(self, reason: str = "closed", grace_s: float = 0.0) -> None:
        """End the call: flush the open utterance, drain, close the peer, await tasks.

        With ``grace_s`` (server shutdown) the audio stops first while the peer stays up, so
        the open utterance's ``completed`` still reaches the client; whatever is not done
        after ``grace_s`` is cancelled. Safe to call more than once and from several places.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(reason, grace_s))
        # Shielded: a caller that gives up waiting does not abort the close half-way.
        await asyncio.shield(self._closing)

    async def _close(self, reason: str, grace_s: float) -> None:
        session = self.session
        session.end_reason = session.end_reason or reason
        if grace_s > 0 and self._main is not None and not self._main.done():
            self._stop_audio()
            await asyncio.wait({self._main}, timeout=grace_s)
            if not self._main.done():
                self._main.cancel()  # out of grace: what is still transcribing is dropped
                await session.close()
        self._ending = True
        if not self._track.done():
            self._track.cancel()
        # Closing the peer stops the track, which ends the pump; the session then flushes
        # and drains.
        await self._close_peer()
        if self._audio is not None:
            self._audio.stop()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        await self._cancel_tasks()
        await session.close()
        self._mark_closed()

    def _stop_audio(self) -> None:
        """End the audio input now; the session then flushes, drains and the peer closes."""
        self._stop_requested = True
        self._stop_event.set()
        if self._audio is not None:
            self._audio.stop()
        elif not self._track.done():
            self._track.cancel()

    async def _run(self) -> None:
        session = self.session
        reason: str | None = None
        try:
            reason = await self._carry()
        finally:
            session.end(reason or "closed")
            # The session flushes and drains while the peer is still up: the last
            # ``completed`` must leave before pc.close() aborts SCTP.
            await session.wait_done()
            self._ending = True
            await self._close_peer()
            await session.close()
            self._mark_closed()

    async def _carry(self) -> str | None:
        """Wait for the track and the connection, then pump audio; returns why it ended."""
        try:
            track = await asyncio.wait_for(
                asyncio.shield(self._track), self._config.audio.idle_timeout_s
            )
        except TimeoutError:
            return "no_audio"
        except asyncio.CancelledError:
            if self._track.cancelled():  # close() before any audio arrived
                return None
            raise
        reason = await self._wait_connected()
        if reason is not None or self.pc.connectionState != "connected":
            return reason
        self.session.go_live()
        return await self._pump(track)

    async def _wait_connected(self) -> str | None:
        """Until ICE + DTLS are up (so a slow set-up is not mistaken for a silent peer)."""
        waiters = [
            asyncio.ensure_future(self._peer_settled.wait()),
            asyncio.ensure_future(self._stop_event.wait()),
        ]
        try:
            await asyncio.wait(
                waiters, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not self._peer_settled.is_set() and not self._stop_requested:
            return "connect_timeout"
        return None

    async def _pump(self, track: MediaStreamTrack) -> str | None:
        audio = self._audio = AudioInput(track, self._config.audio.idle_timeout_s)
        if self._stop_requested:
            audio.stop()
        async for chunk in audio.chunks():
            # The resampler's tail comes after the end: not timed as live audio.
            timed = audio.end_reason is None
            await self.session.put_audio(AudioIn(chunk.samples, chunk.received_at, timed))
        return audio.end_reason

    async def _close_peer(self) -> None:
        """``pc.close()`` once, shared by every path that ends the call."""
        if self._peer_closing is None:
            self._peer_closing = asyncio.ensure_future(close_peer(self.pc))
        await asyncio.shield(self._peer_closing)

    def _mark_closed(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            if self._on_closed is not None:
                self._on_closed(self)

    # -- peer wiring -------------------------------------------------------------------

    def _wire_peer(self) -> None:
        pc = self.pc

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and not self._track.done():
                self._track.set_result(track)

        @pc.on("datachannel")
        def _on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != self._config.webrtc.data_channel or self._channel is not None:
                return
            # A channel created by the browser is already open when aiortc emits it:
            # waiting for "open" here would wait forever.
            self._channel = channel
            channel.on("message", self._on_message)
            channel.on("close", self._on_channel_close)
            limit = self._config.limits.channel_buffer_bytes
            self.session.attach(DataChannelSink(channel, limit))

        pc.on(MESSAGE_TOO_LARGE, self._on_message_too_large)

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("connected", "failed", "closed"):
                self._peer_settled.set()
            if pc.connectionState == "failed":
                self.session.end_reason = self.session.end_reason or "connection_failed"
                # aiortc keeps the track alive after ICE failure; closing the peer ends it,
                # and the session then flushes and drains as for any other ending.
                self._spawn(self._close_peer())

    def _on_message(self, raw: str | bytes) -> None:
        if not self.session.put_message(raw):
            # The session is far behind (its inbound queue is full): refuse, keep the call.
            self.session.refuse(
                "input_buffer_full", "too many messages at once: this one was dropped"
            )

    def _on_channel_close(self) -> None:
        # The client closed its events channel: nothing can reach it any more, end the call.
        if not self._ending and self._closing is None:
            self._closing = asyncio.ensure_future(self._close("data_channel_closed", 0.0))

    def _on_message_too_large(self) -> None:
        # The peer ignored the max-message-size of our answer (no browser does), and SCTP no
        # longer reads its data: end the call, flushing the open utterance as on max_duration.
        if self._ending or self._stop_requested:
            return
        message = f"data-channel messages are limited to {MAX_MESSAGE_BYTES} bytes: the call ends"
        self.session.fail("message_too_large", message)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

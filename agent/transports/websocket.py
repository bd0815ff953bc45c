"""An OpenAI Realtime WebSocket (``/v1/realtime?intent=transcription``) carrying one
``TranscriptionSession``.

Every text message goes on the session's inbound queue as it comes (appends, updates,
commits, in order); events go out through ``WebSocketSink``, whose own queue lets the session
send without awaiting and tells it how much the client has not read. The socket ends when
the client closes it or vanishes, on no message for ``audio.idle_timeout_s``, on a message
over ``limits.ws_max_message_bytes`` (close code 1009), when the client pushes audio faster
than it can be handled past ``limits.input_buffer_bytes`` (an ``error``, then close), on
``limits.max_call_s`` and at server shutdown. However it ends, the open utterance is flushed
to the engine and everything is released.

aiohttp's ``WebSocketResponse`` is the transport here; the route that admits and upgrades
a request is ``signaling.realtime``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

from agent.audio_formats import PCM16_24K
from agent.event_sink import EventSink
from agent.session import Carriage, SessionDeps, TranscriptionSession

log = logging.getLogger(__name__)

#: How long a closing socket waits for its last events to leave.
FLUSH_TIMEOUT_S = 2.0
#: Close code for a session the server ends (RFC 6455 "going away" is for shutdowns).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class WebSocketSink(EventSink):
    """Events on the socket, in order, written by one task; ``send`` never awaits."""

    def __init__(self, ws: web.WebSocketResponse, limit: int) -> None:
        super().__init__(limit)
        self._ws = ws
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = asyncio.create_task(self._pump(), name="ws-writer")

    def is_open(self) -> bool:
        return not self._ws.closed and not self._writer.done()

    def _write(self, text: str) -> None:
        self._queue.append(text)
        self._queued_bytes += len(text)
        self._idle.clear()
        self._wake.set()

    def buffered_amount(self) -> int:
        transport = self._ws._req.transport if self._ws._req is not None else None
        pending = transport.get_write_buffer_size() if transport is not None else 0
        return self._queued_bytes + pending

    async def flush(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def close(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

    async def _pump(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    text = self._queue.popleft()
                    await self._ws.send_str(text)
                    self._queued_bytes -= len(text)
                self._idle.set()
        except (ConnectionError, RuntimeError):
            self._idle.set()  # the client is gone: nothing more can be sent


class RealtimeSocket:
    """One accepted WebSocket and its session: ``run()`` until it ends."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        deps: SessionDeps,
        on_closed: Callable[[RealtimeSocket], None] | None = None,
    ) -> None:
        self.ws = ws
        self._config = deps.config
        self._on_closed = on_closed
        carriage = Carriage("websocket", PCM16_24K, deps.config.limits.ws_max_message_bytes)
        self.session = TranscriptionSession(deps, carriage, stop_input=self._stop_input)
        self.id = self.session.id
        self._stop = asyncio.Event()
        self._close_code = CLOSE_NORMAL
        self._done = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def end_reason(self) -> str | None:
        return self.session.end_reason

    async def run(self) -> None:
        """Carry the session until it ends; returns once everything is released.

        Run it as a task of its own (``close()`` may cancel it): the route shields it, so a
        client that vanishes cancels the HTTP handler but not this, and its open utterance
        is still flushed and drained."""
        self._runner = asyncio.current_task()
        session = self.session
        sink = WebSocketSink(self.ws, self._config.limits.channel_buffer_bytes)
        session.attach(sink)
        session.start()
        session.go_live()
        try:
            reason = await self._read()
            session.end(reason)
            await session.wait_done()
            await sink.flush(FLUSH_TIMEOUT_S)
            if not self.ws.closed:
                await self.ws.close(code=self._close_code)
        finally:
            await session.close()  # closes the sink too
            self._done.set()
            if self._on_closed is not None:
                self._on_closed(self)

    async def close(self, reason: str = "closed", grace_s: float = 0.0) -> None:
        """End from the server's side: stop reading, flush, close (shutdown gives grace)."""
        self.session.end_reason = self.session.end_reason or reason
        self._close_code = CLOSE_GOING_AWAY if reason == "server_shutdown" else CLOSE_NORMAL
        self._stop_input()
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), max(grace_s, 0.5))
        except TimeoutError:
            if self._runner is not None:
                self._runner.cancel()
            await self._done.wait()

    def _stop_input(self) -> None:
        if self.session.end_reason in ("input_buffer_full", "message_too_large"):
            self._close_code = CLOSE_POLICY
        self._stop.set()

    async def _read(self) -> str:
        """Client messages onto the session's queue until the input ends; returns why."""
        stop = asyncio.ensure_future(self._stop.wait())
        idle_s = self._config.audio.idle_timeout_s
        try:
            while True:
                msg = await receive_until(self.ws, stop, idle_s)
                if msg is None:
                    return "stopped" if stop.done() else "idle_timeout"
                if msg.type == WSMsgType.TEXT:
                    if not self.session.put_message(msg.data):
                        limit = self._config.limits.input_buffer_bytes
                        self.session.fail(
                            "input_buffer_full",
                            f"audio arrives faster than it can be transcribed: over {limit} "
                            "bytes are waiting; send it at most a few times real time",
                        )
                        return "input_buffer_full"
                elif msg.type == WSMsgType.BINARY:
                    self.session.refuse(
                        "invalid_request_error", "binary frames are not accepted: send JSON text"
                    )
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp has already closed with 1009 for an oversize message.
                    too_big = "too big" in str(msg.data).lower() or self.ws.close_code == 1009
                    return "message_too_large" if too_big else "client_error"
                elif msg.type == WSMsgType.CLOSE:
                    return "client_closed"
                else:  # CLOSING, CLOSED: the connection ended without a close frame
                    return "client_gone"
        finally:
            stop.cancel()


async def receive_until(
    ws: web.WebSocketResponse, stop: asyncio.Future[Any], timeout_s: float
) -> WSMessage | None:
    """The socket's next message, or ``None`` if ``stop`` is done or ``timeout_s`` passes
    first (the pending receive is then cancelled: aiohttp allows one reader at a time)."""
    receive = asyncio.ensure_future(ws.receive())
    done, _ = await asyncio.wait(
        {receive, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    if receive in done:
        return receive.result()
    receive.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await receive
    return None

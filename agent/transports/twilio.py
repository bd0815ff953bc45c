"""A Twilio Media Stream (``<Start><Stream>`` or ``<Connect><Stream>``): one WebSocket from
Twilio carrying a phone call's audio, transcribed one session per track.

Twilio sends ``connected``, then ``start`` (the call, its tracks, the media format, the
``<Parameter>``s), then ``media`` chunks of 8 kHz mu-law (~20 ms each, per track), ``dtmf``
and ``mark``, and ``stop`` when the stream ends. Nothing is ever sent back: even on a
bidirectional ``<Connect><Stream>`` Twilio would play what we sent to the caller. The
sessions' events go to the call's ``CallHub`` (subscribers, the webhook) instead, each
carrying ``call_sid`` and ``track``.

Nothing starts before a valid ``start``: ``media`` before it, a ``start`` refused by the
server's hook (no valid token in its parameters, the server full), a media format other than
mu-law 8 kHz mono, or no ``start`` within ``telephony.start_timeout_s`` closes the socket
with a close code and a reason. After ``start``, a message that cannot be parsed is counted
and skipped (one bad message must not end a phone call), and an event type Twilio adds later
is ignored.

Audio time follows Twilio's ``timestamp`` (``agent.stream_clock``): gaps become silence,
repeats and late chunks are dropped. mu-law is decoded here, on the event loop: 28 µs per
20 ms chunk measured on this project's 2-core machines (a table lookup and PyAV's
resampler), less than the thread hop that moving it off the loop would cost.

The stream ends on ``stop``, when Twilio closes or drops the socket, after
``audio.idle_timeout_s`` without a message, on a message over ``MAX_MESSAGE_BYTES`` (close
1009), at ``limits.max_call_s`` and at shutdown; however it ends, each track's open
utterance is flushed to the engine and its ``completed`` published before the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import WSMessage, WSMsgType, web

from agent import events, twilio_messages
from agent.audio_formats import PCMU, PcmDecoder
from agent.call_hub import CallHub
from agent.errors import ProtocolError
from agent.session import AudioIn, Carriage, SessionDeps, TranscriptionSession
from agent.stream_clock import TrackClock
from agent.transports.websocket import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    receive_until,
)
from agent.twilio_messages import Media, Start

log = logging.getLogger(__name__)

#: Twilio's messages are a few hundred bytes; a ``start`` with its parameters a few KB.
MAX_MESSAGE_BYTES = 65_536
#: How long a closing stream waits for its last events to reach the hub's subscribers.
FLUSH_TIMEOUT_S = 2.0
CLOSE_UNSUPPORTED = 1003
CLOSE_TRY_LATER = 1013
#: Our extension event for a key the caller pressed.
DTMF = "voxtral.dtmf"


class StreamRefused(Exception):
    """The server will not carry this stream (raised by ``StreamHooks.on_start``)."""

    def __init__(self, code: str, message: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code


@dataclass(frozen=True)
class StreamHooks:
    """What the server decides for a stream (the transport knows no HTTP, no tokens)."""

    #: A valid ``start``: admit it (auth, capacity) and give the call's hub, or raise
    #: ``StreamRefused``.
    on_start: Callable[[TwilioStream, Start], CallHub]
    #: The stream has ended and released everything.
    on_closed: Callable[[TwilioStream], None]


@dataclass(eq=False)
class _Track:
    session: TranscriptionSession
    clock: TrackClock
    decoder: PcmDecoder


class TwilioStream:
    """One accepted Twilio WebSocket: ``run()`` until it ends."""

    def __init__(self, ws: web.WebSocketResponse, deps: SessionDeps, hooks: StreamHooks) -> None:
        self.ws = ws
        self.id = events.new_id("stream")
        self._deps = deps
        self._config = deps.config
        self._hooks = hooks
        self.start: Start | None = None
        self.hub: CallHub | None = None
        self.end_reason: str | None = None
        self._tracks: dict[str, _Track] = {}
        self._stop = asyncio.Event()
        self._close_code = CLOSE_NORMAL
        self._close_message = ""
        self._done = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._log = logging.LoggerAdapter(log, {"call_id": self.id})

    @property
    def sessions(self) -> list[TranscriptionSession]:
        return [t.session for t in self._tracks.values()]

    @property
    def weight(self) -> int:
        """Call slots this stream holds: one per track's session, one while it waits."""
        return max(1, len(self._tracks))

    async def run(self) -> None:
        """Carry the stream until it ends; returns once everything is released. Run it as
        a task of its own: the route shields it (a vanished socket still flushes)."""
        self._runner = asyncio.current_task()
        try:
            reason = await self._read()
            self.end_reason = self.end_reason or reason
            await self._finish(self.end_reason)
        finally:
            for track in self._tracks.values():
                await track.session.close()
            self._done.set()
            self._hooks.on_closed(self)

    async def close(self, reason: str = "closed", grace_s: float = 0.0) -> None:
        """End from the server's side: stop reading, flush, close (shutdown gives grace)."""
        self.end_reason = self.end_reason or reason
        self._close_code = CLOSE_GOING_AWAY if reason == "server_shutdown" else CLOSE_NORMAL
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), max(grace_s, 0.5))
        except TimeoutError:
            if self._runner is not None:
                self._runner.cancel()
            await self._done.wait()

    # -- reading -------------------------------------------------------------------------

    async def _read(self) -> str:
        """Twilio's messages until the stream ends; returns why."""
        stop = asyncio.ensure_future(self._stop.wait())
        loop = asyncio.get_running_loop()
        start_deadline = loop.time() + self._config.telephony.start_timeout_s
        try:
            while True:
                if self.start is None:
                    wait_s = start_deadline - loop.time()
                    if wait_s <= 0:
                        return self._refuse("start_timeout", "no start message in time")
                else:
                    wait_s = self._config.audio.idle_timeout_s
                msg = await receive_until(self.ws, stop, wait_s)
                if msg is None:
                    if stop.done():
                        return "stopped"
                    if self.start is None:
                        continue  # the start deadline is checked at the top
                    return "idle_timeout"
                reason = await self._received(msg)
                if reason is not None:
                    return reason
        finally:
            stop.cancel()

    async def _received(self, msg: WSMessage) -> str | None:
        """One WebSocket message; the end reason when it ends the stream."""
        if msg.type == WSMsgType.TEXT:
            return await self._handle(msg.data, time.perf_counter())
        if msg.type == WSMsgType.BINARY:
            binary = ProtocolError("binary frames are not Twilio's", "invalid_json")
            return self._bad_message(binary)
        if msg.type == WSMsgType.ERROR:
            # aiohttp has already closed with 1009 for an oversize message.
            too_big = "too big" in str(msg.data).lower() or self.ws.close_code == 1009
            return "message_too_large" if too_big else "client_error"
        if msg.type == WSMsgType.CLOSE:
            return "client_closed"
        return "client_gone"  # CLOSING, CLOSED: the connection ended without a close frame

    async def _handle(self, raw: str, received_at: float) -> str | None:
        try:
            msg = twilio_messages.parse(raw)
        except ProtocolError as exc:
            return self._bad_message(exc)
        if isinstance(msg, Media):
            if self.start is None:
                return self._refuse("media_before_start", "a media message came before start")
            await self._media(msg, received_at)
        elif isinstance(msg, Start):
            if self.start is None:
                return self._start(msg)
            self._bad_message(ProtocolError("a second start message", "duplicate_start"))
        elif isinstance(msg, twilio_messages.Stop):
            return "twilio_stop"
        elif isinstance(msg, twilio_messages.Dtmf):
            self._dtmf(msg)
        elif isinstance(msg, twilio_messages.Unknown):
            # A message type Twilio added after this was written: not an error.
            self._log.debug("stream %s: ignoring a %r message", self.id, msg.event)
        return None  # connected, mark (we send no audio, so none is expected)

    def _bad_message(self, exc: ProtocolError) -> str | None:
        """Before ``start`` nothing is running: refuse. After it, count and skip."""
        if self.start is None:
            return self._refuse(exc.code, str(exc))
        self._deps.observer.protocol_error(exc.code)
        self._log.info("stream %s: skipped a bad message (%s): %s", self.id, exc.code, exc)
        return None

    def _refuse(self, code: str, message: str, close_code: int = CLOSE_POLICY) -> str:
        self._deps.observer.protocol_error(code)
        self._log.info("stream %s refused (%s): %s", self.id, code, message)
        self._close_code = close_code
        self._close_message = f"{code}: {message}"
        return code

    # -- start, media ---------------------------------------------------------------------

    def _start(self, start: Start) -> str | None:
        fmt = start.media_format
        if not fmt.is_mulaw_8k_mono:
            return self._refuse(
                "unsupported_media_format",
                f"{fmt.describe()}; only audio/x-mulaw 8000 Hz mono is transcribed",
                CLOSE_UNSUPPORTED,
            )
        try:
            self.hub = self._hooks.on_start(self, start)
        except StreamRefused as exc:
            return self._refuse(exc.code, str(exc), exc.close_code)
        self.start = start
        self._log = logging.LoggerAdapter(log, {"call_id": self.id, "call_sid": start.call_sid})
        for name in start.tracks:
            self._tracks[name] = self._open_track(start, name, self.hub)
        self._log.info(
            "stream %s (%s) of call %s: tracks %s -> %s",
            self.id,
            start.stream_sid,
            start.call_sid,
            ",".join(start.tracks),
            ", ".join(t.session.id for t in self._tracks.values()),
        )
        return None

    def _open_track(self, start: Start, name: str, hub: CallHub) -> _Track:
        fields = {"call_sid": start.call_sid, "track": name}
        carriage = Carriage("twilio", PCMU, MAX_MESSAGE_BYTES, event_fields=fields)
        session = TranscriptionSession(self._deps, carriage, stop_input=self._stop_input)
        session.attach(hub.sink(self._config.limits.channel_buffer_bytes))
        session.start()
        session.go_live()
        return _Track(session, TrackClock(), PcmDecoder(PCMU))

    async def _media(self, media: Media, received_at: float) -> None:
        track = self._tracks.get(media.track)
        if track is None:
            self._bad_message(ProtocolError(f"media of track {media.track!r}", "unknown_track"))
            return
        data = track.clock.place(media.timestamp_ms, media.payload)
        if data is None:
            return  # a repeat or a late chunk: its time has passed
        samples = track.decoder.decode(data)
        if len(samples):
            await track.session.put_audio(AudioIn(samples, received_at))

    def _dtmf(self, dtmf: twilio_messages.Dtmf) -> None:
        if self.hub is None or self.start is None:
            return
        event = events.dtmf(dtmf.digit, dtmf.track, self.start.call_sid)
        self.hub.publish(json.dumps(event), DTMF)

    def _stop_input(self) -> None:
        """A session ends itself (``max_duration``): the whole stream ends with it."""
        self._stop.set()

    # -- the end ----------------------------------------------------------------------------

    async def _finish(self, reason: str) -> None:
        """Flush every track (the resampler's tail, the open utterance), wait for their
        transcripts to be published, then close the socket."""
        for track in self._tracks.values():
            tail = track.decoder.flush()
            if len(tail):
                await track.session.put_audio(AudioIn(tail, time.perf_counter(), timed=False))
            track.session.end(reason)
        await asyncio.gather(*(t.session.wait_done() for t in self._tracks.values()))
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.close(
                    code=self._close_code, message=self._close_message.encode()[:120]
                )

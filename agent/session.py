"""One WebRTC call: the only place that knows every stage.

audio track -> ``AudioInput`` (16 kHz mono) -> ``SpeechDetector`` (VAD + segmenter, on a
worker thread) -> ``EngineWorker`` (shared, batched) -> OpenAI Realtime events on the
``oai-events`` data channel.

The session owns its tasks: ``_run`` (the audio pump, then the drain) and one task per
utterance being transcribed. ``close()`` cancels and awaits all of them. The call ends on
end of track, ``pc.close()``, ICE failure, a closed data channel, no audio for
``audio.idle_timeout_s``, ``limits.max_call_s`` or server shutdown; in every case the open
utterance is flushed to the engine first.

Sending is bounded too: events wait for the data channel in a queue of ``limits.event_queue``
(oldest dropped), and once the channel's send buffer holds more than
``limits.channel_buffer_bytes`` (a client that does not read), deltas, interims, lag
notices and errors are dropped; ``completed``, ``failed`` and every other event are sent
until they alone fill it to ``CHANNEL_BUFFER_HARD_FACTOR`` times that: then the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from agent import events
from agent.audio_input import AudioInput
from agent.config import Config
from agent.detector import DetectorEvent, SpeechDetector
from agent.engines.worker import EngineWorker
from agent.errors import EngineError, ProtocolError
from agent.items import ENGINE_LAG, ItemPipeline
from agent.observer import AudioLagMeter, CallObserver
from agent.peer import MAX_MESSAGE_BYTES, MESSAGE_TOO_LARGE, close_peer
from agent.segmenter import SegmenterOptions
from agent.vad import Vad

log = logging.getLogger(__name__)

#: Longest wait for in-flight transcriptions once the call's audio has ended.
DRAIN_TIMEOUT_S = 30.0
#: Longest wait for the data channel to hand its last events to SCTP before the peer closes.
FLUSH_TIMEOUT_S = 1.0
#: Longest ICE + DTLS set-up; ``audio.idle_timeout_s`` only counts once media can flow.
CONNECT_TIMEOUT_S = 20.0
#: Events dropped first when a client does not read its data channel. ``error`` too: a
#: client could otherwise have one queued for every bad message it sends.
DROPPABLE = frozenset(
    {f"{events.TRANSCRIPTION}.delta", f"{events.TRANSCRIPTION}.interim", ENGINE_LAG, "error"}
)
#: A client that does not read (send buffer past ``limits.channel_buffer_bytes``) may have
#: events that are never dropped fill it up to this many times that limit; then the call
#: ends (``client_not_reading``): no client can make the server hold memory without bound.
CHANNEL_BUFFER_HARD_FACTOR = 4


@dataclass(frozen=True)
class SessionDeps:
    """What every call shares: configuration, the engine worker, the VAD model, a thread pool."""

    config: Config
    worker: EngineWorker
    vad: Vad
    executor: Executor
    observer: CallObserver = field(default_factory=CallObserver)


class CallSession:
    def __init__(
        self,
        pc: RTCPeerConnection,
        deps: SessionDeps,
        on_closed: Callable[[CallSession], None] | None = None,
    ) -> None:
        self.id = events.new_id("sess")
        self.pc = pc
        self._deps = deps
        self._config = deps.config
        self._on_closed = on_closed
        self._observer = deps.observer
        self._log = logging.LoggerAdapter(log, {"call_id": self.id})
        self._options = SegmenterOptions.from_config(deps.config.vad, deps.config.segmenter)
        self._detector = SpeechDetector(
            deps.vad.stream(),
            self._options,
            deps.config.engine.interim_interval_ms,
            speculative=deps.config.engine.speculative_final,
        )
        # Serialises detector use between the audio pump and client commands.
        self._detector_lock = asyncio.Lock()
        self._items = ItemPipeline(deps.worker, self._send, self._spawn, self._observer, self.id)
        self._items.language = deps.config.engine.language or None
        self._items.deltas = deps.config.engine.interim_interval_ms > 0
        self._items.speculative = deps.config.engine.speculative_final
        self._channel: RTCDataChannel | None = None
        self._outbox: deque[str] = deque(maxlen=deps.config.limits.event_queue)
        self.dropped_events = 0
        #: Bytes sent since the send buffer last was under ``limits.channel_buffer_bytes``.
        self._unread_bytes = 0
        self._track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self._audio: AudioInput | None = None
        self._closed = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self._peer_closing: asyncio.Task[None] | None = None
        #: Set once the call is on its way out: audio stopping, or the peer closing.
        self._ending = False
        self._stop_requested = False
        self._stop_event = asyncio.Event()
        #: Set once the peer is connected, failed or closed.
        self._peer_settled = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None
        self.end_reason: str | None = None
        self._wire_peer()
        self._send(events.session_created(self.describe()))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"session-{self.id}")
        max_call_s = self._config.limits.max_call_s
        if max_call_s > 0:
            self._expiry = asyncio.get_running_loop().call_later(max_call_s, self._expire)

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
        self.end_reason = self.end_reason or reason
        if grace_s > 0 and self._main is not None and not self._main.done():
            self._stop_audio()
            await asyncio.wait({self._main}, timeout=grace_s)
            if not self._main.done():
                self._main.cancel()  # out of grace: what is still transcribing is dropped
        self._ending = True
        if not self._track.done():
            self._track.cancel()
        # Closing the peer stops the track, which ends the pump, which flushes and drains.
        await self._close_peer()
        if self._audio is not None:
            self._audio.stop()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        await self._cancel_tasks()
        self._mark_closed()

    def _stop_audio(self) -> None:
        """End the audio input now; the pump then flushes, drains and closes the peer."""
        self._stop_requested = True
        self._stop_event.set()
        if self._audio is not None:
            self._audio.stop()
        elif not self._track.done():
            self._track.cancel()

    def _expire(self) -> None:
        self._expiry = None
        self._log.info("call %s reached limits.max_call_s", self.id)
        self.end_reason = self.end_reason or "max_duration"
        self._stop_audio()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def utterances(self) -> int:
        """Utterances committed to the engine so far."""
        count: int = self._items.utterances
        return count

    @property
    def heard_ms(self) -> int:
        """Audio of this call run through the VAD so far, in ms of the call's audio."""
        return self._detector.segmenter.clock_ms

    def describe(self) -> dict[str, Any]:
        """The ``session`` object of ``session.created`` / ``session.updated``."""
        o = self._options
        turn: dict[str, Any] | None = None
        if o.turn_detection:
            turn = {
                "type": "server_vad",
                "threshold": o.threshold,
                "prefix_padding_ms": o.prefix_padding_ms,
                "silence_duration_ms": o.min_silence_ms,
            }
        return {
            "id": self.id,
            "object": "realtime.transcription_session",
            "input_audio_format": "opus",
            "input_audio_transcription": {
                "model": self._deps.worker.engine.name,
                "language": self._items.language,
                "prompt": self._items.prompt or "",
            },
            "turn_detection": turn,
            "include_interim": self._items.include_interim,
        }

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
            while self._outbox:
                channel.send(self._outbox.popleft())

        pc.on(MESSAGE_TOO_LARGE, self._on_message_too_large)

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("connected", "failed", "closed"):
                self._peer_settled.set()
            if pc.connectionState == "failed":
                self.end_reason = self.end_reason or "connection_failed"
                # aiortc keeps the track alive after ICE failure; closing the peer ends it,
                # and the pump then flushes and drains as for any other ending.
                self._spawn(self._close_peer())

    def _on_channel_close(self) -> None:
        # The client closed its events channel: nothing can reach it any more, end the call.
        if not self._ending and self._closing is None:
            self._closing = asyncio.ensure_future(self._close("data_channel_closed", 0.0))

    def _send(self, event: events.Event) -> None:
        text = json.dumps(event, ensure_ascii=False)
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            limit = self._config.limits.channel_buffer_bytes
            if channel.bufferedAmount <= limit:
                self._unread_bytes = 0  # the client reads (again)
            elif event["type"] in DROPPABLE:
                # The client is not reading: keep the buffer bounded, finals still go.
                self.dropped_events += 1
                self._observer.event_dropped("backpressure")
                return
            else:
                # Counted from what we add rather than read from ``bufferedAmount``: the
                # buffer is bounded by the limit plus this allowance whatever it reports.
                self._unread_bytes += len(text.encode())
                if self._unread_bytes > (CHANNEL_BUFFER_HARD_FACTOR - 1) * limit:
                    self.dropped_events += 1
                    self._observer.event_dropped("backpressure")
                    self._end_not_reading(channel.bufferedAmount)
                    return
            channel.send(text)
        elif channel is None:
            if len(self._outbox) == self._outbox.maxlen:
                self.dropped_events += 1  # oldest goes: the newest state matters most
                self._observer.event_dropped("outbox_full")
            self._outbox.append(text)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, EngineError):
            # Expected failures (EngineError) become events where the result is awaited, or
            # do not matter (a withdrawn speculative decode); anything else is a bug.
            self._log.error("call %s: task failed", self.id, exc_info=exc)

    # -- audio path --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            try:
                track = await asyncio.wait_for(
                    asyncio.shield(self._track), self._config.audio.idle_timeout_s
                )
            except TimeoutError:
                self.end_reason = self.end_reason or "no_audio"
                return
            except asyncio.CancelledError:
                if self._track.cancelled():  # close() before any audio arrived
                    return
                raise
            if not await self._wait_connected():
                return
            await self._pump(track)
            await self._drain()
            if self.end_reason == "max_duration":
                # As OpenAI's Realtime API says it when a session reaches its maximum length.
                limit = self._config.limits.max_call_s
                self._send(events.error("session_expired", f"the call reached {limit:g} s"))
            await self._flush_channel()
        finally:
            self._ending = True
            await self._close_peer()
            self._mark_closed()

    async def _close_peer(self) -> None:
        """``pc.close()`` once, shared by every path that ends the call."""
        if self._peer_closing is None:
            self._peer_closing = asyncio.ensure_future(close_peer(self.pc))
        await asyncio.shield(self._peer_closing)

    async def _flush_channel(self) -> None:
        # aiortc's pc.close() aborts SCTP at once, dropping what the channel has not handed
        # to SCTP yet: give the last events (a flushed utterance's completed) a moment.
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_TIMEOUT_S
        while channel.bufferedAmount > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # the flush task sends the last chunk on a later turn

    async def _wait_connected(self) -> bool:
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
        if self.pc.connectionState == "connected":
            return True
        if not self._peer_settled.is_set() and not self._stop_requested:
            self.end_reason = self.end_reason or "connect_timeout"
        return False

    async def _pump(self, track: MediaStreamTrack) -> None:
        audio = self._audio = AudioInput(track, self._config.audio.idle_timeout_s)
        if self._stop_requested:
            audio.stop()
        loop = asyncio.get_running_loop()
        lag = AudioLagMeter()
        async for chunk in audio.chunks():
            async with self._detector_lock:
                found = await loop.run_in_executor(
                    self._deps.executor, self._detector.process, chunk.samples
                )
            self._handle(found)
            if audio.end_reason is None:  # the resampler's tail comes after the end
                late = lag.lag(chunk.received_at, len(chunk.samples), time.perf_counter())
                self._observer.audio_lag(late)
        self.end_reason = self.end_reason or audio.end_reason
        async with self._detector_lock:
            found = await loop.run_in_executor(self._deps.executor, self._detector.flush)
        self._handle(found)

    def _handle(self, found: Sequence[DetectorEvent]) -> None:
        self._items.handle(found)

    async def _drain(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _mark_closed(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            self._log.info(
                "call %s ended (%s), %d utterances", self.id, self.end_reason, self.utterances
            )
            self._observer.call_ended(self.end_reason or "closed")
            if self._on_closed is not None:
                self._on_closed(self)

    def _end_not_reading(self, buffered: int) -> None:
        """End a call whose client does not read its data channel (once)."""
        if self._ending or self._closing is not None:
            return  # already on its way out
        self._log.warning(
            "call %s: the client does not read its data channel (%d bytes unsent): ending it",
            self.id,
            buffered,
        )
        self._closing = asyncio.ensure_future(self._close("client_not_reading", 0.0))

    # -- client events -----------------------------------------------------------------

    def _on_message_too_large(self) -> None:
        # The peer ignored the max-message-size of our answer (no browser does), and SCTP no
        # longer reads its data: end the call, flushing the open utterance as on max_duration.
        if self._ending or self._stop_requested:
            return
        self._observer.protocol_error("message_too_large")
        message = f"data-channel messages are limited to {MAX_MESSAGE_BYTES} bytes: the call ends"
        self._send(events.error("message_too_large", message))
        self.end_reason = self.end_reason or "message_too_large"
        self._stop_audio()

    def _on_message(self, raw: str | bytes) -> None:
        try:
            msg = events.parse_client_event(raw)
        except ProtocolError as exc:
            self._observer.protocol_error(exc.code)
            self._send(events.error(exc.code, str(exc)))
            return
        self._spawn(self._apply(msg))

    async def _apply(self, msg: events.ClientEvent) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(msg, events.SessionUpdate):
            self._update_session(msg)
            async with self._detector_lock:
                found = self._detector.segmenter.update(self._options)
            self._handle(found)
            self._send(events.session_updated(self.describe()))
        elif isinstance(msg, events.Commit):
            async with self._detector_lock:
                found = await loop.run_in_executor(
                    self._deps.executor, self._detector.segmenter.commit
                )
            if not found:
                self._send(
                    events.error(
                        "input_audio_buffer_commit_empty",
                        "nothing to commit: the buffer holds no speech",
                        event_id=msg.event_id,
                    )
                )
            self._handle(found)
        elif isinstance(msg, events.Clear):
            async with self._detector_lock:
                self._detector.clear()
            self._items.clear()
            self._send(events.cleared())

    def _update_session(self, msg: events.SessionUpdate) -> None:
        if msg.language is not None:
            self._items.language = msg.language or None
        if msg.prompt is not None:
            self._items.prompt = msg.prompt or None
        if msg.include_interim is not None:
            self._items.include_interim = msg.include_interim
        if msg.turn_detection_off:
            self._options = replace(self._options, turn_detection=False)
        elif msg.turn_detection is not None:
            td = msg.turn_detection
            self._options = self._options.with_turn_detection(
                td.threshold, td.prefix_padding_ms, td.silence_duration_ms
            )

"""One WebRTC call: the only place that knows every stage.

audio track -> ``AudioInput`` (16 kHz mono) -> ``SpeechDetector`` (VAD + segmenter, on a
worker thread) -> ``EngineWorker`` (shared, batched) -> OpenAI Realtime events on the
``oai-events`` data channel.

The session owns its tasks: ``_run`` (the audio pump, then the drain) and one task per
utterance being transcribed. ``close()`` cancels and awaits all of them. The call ends on
end of track, ``pc.close()``, ICE failure, or no audio for ``audio.idle_timeout_s``; in every
case the open utterance is flushed to the engine first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from agent import events
from agent.audio_input import AudioInput
from agent.config import Config
from agent.detector import SpeechDetector
from agent.engines.base import EngineRequest
from agent.engines.worker import EngineWorker
from agent.errors import EngineError, ProtocolError
from agent.segmenter import (
    SegmenterEvent,
    SegmenterOptions,
    SpeechStarted,
    SpeechStopped,
    Utterance,
)
from agent.vad import Vad

log = logging.getLogger(__name__)

#: Longest wait for in-flight transcriptions once the call's audio has ended.
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SessionDeps:
    """What every call shares: configuration, the engine worker, the VAD model, a thread pool."""

    config: Config
    worker: EngineWorker
    vad: Vad
    executor: Executor


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
        self._options = SegmenterOptions.from_config(deps.config.vad, deps.config.segmenter)
        self._detector = SpeechDetector(deps.vad.stream(), self._options)
        # Serialises detector use between the audio pump and client commands.
        self._detector_lock = asyncio.Lock()
        self._language: str | None = deps.config.engine.language or None
        self._prompt: str | None = None
        self._channel: RTCDataChannel | None = None
        self._outbox: deque[str] = deque(maxlen=deps.config.limits.event_queue)
        self.dropped_events = 0
        self._track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._items: dict[int, str] = {}
        self._last_item_id: str | None = None
        #: Per utterance index: wall time and audio time at which its end was decided.
        self._stops: dict[int, tuple[float, int]] = {}
        self._main: asyncio.Task[None] | None = None
        self._audio: AudioInput | None = None
        self._closed = asyncio.Event()
        self.end_reason: str | None = None
        self.utterances = 0
        self._wire_peer()
        self._send(events.session_created(self.describe()))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"session-{self.id}")

    async def close(self, reason: str = "closed") -> None:
        """End the call now: flush the open utterance, drain, close the peer, await tasks."""
        self.end_reason = self.end_reason or reason
        if not self._track.done():
            self._track.cancel()
        # Closing the peer stops the track, which ends the pump, which flushes and drains.
        await self.pc.close()
        if self._audio is not None:
            self._audio.stop()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        await self._cancel_tasks()
        self._mark_closed()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

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
                "language": self._language,
                "prompt": self._prompt or "",
            },
            "turn_detection": turn,
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
            while self._outbox:
                channel.send(self._outbox.popleft())

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState == "failed":
                self.end_reason = self.end_reason or "connection_failed"
                # aiortc keeps the track alive after ICE failure; closing the peer ends it,
                # and the pump then flushes and drains as for any other ending.
                self._spawn(pc.close())

    def _send(self, event: events.Event) -> None:
        text = json.dumps(event, ensure_ascii=False)
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        elif channel is None:
            if len(self._outbox) == self._outbox.maxlen:
                self.dropped_events += 1  # oldest goes: the newest state matters most
            self._outbox.append(text)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            await self._pump(track)
            await self._drain()
        finally:
            await self.pc.close()
            self._mark_closed()

    async def _pump(self, track: MediaStreamTrack) -> None:
        audio = self._audio = AudioInput(track, self._config.audio.idle_timeout_s)
        loop = asyncio.get_running_loop()
        async for chunk in audio.chunks():
            async with self._detector_lock:
                found = await loop.run_in_executor(
                    self._deps.executor, self._detector.process, chunk.samples
                )
            self._handle(found)
        self.end_reason = self.end_reason or audio.end_reason
        async with self._detector_lock:
            found = await loop.run_in_executor(self._deps.executor, self._detector.flush)
        self._handle(found)

    def _handle(self, found: list[SegmenterEvent]) -> None:
        for ev in found:
            if isinstance(ev, SpeechStarted):
                item_id = self._items.setdefault(ev.index, events.new_id("item"))
                self._send(events.speech_started(item_id, ev.start_ms))
            elif isinstance(ev, SpeechStopped):
                self._stops[ev.index] = (time.perf_counter(), ev.decided_ms)
                self._send(events.speech_stopped(self._items[ev.index], ev.end_ms))
            elif isinstance(ev, Utterance):
                self._commit(ev)

    def _commit(self, utt: Utterance) -> None:
        item_id = self._items.pop(utt.index, None) or events.new_id("item")
        self._send(events.committed(item_id, self._last_item_id))
        self._last_item_id = item_id
        self.utterances += 1
        decided_at, decided_ms = self._stops.pop(utt.index, (time.perf_counter(), utt.end_ms))
        request = EngineRequest(utt.audio, language=self._language, prompt=self._prompt)
        timings = {"speech_end_ms": float(utt.end_ms), "vad_ms": float(decided_ms - utt.end_ms)}
        self._spawn(self._transcribe(item_id, request, timings, decided_at))

    async def _transcribe(
        self, item_id: str, request: EngineRequest, timings: dict[str, float], decided_at: float
    ) -> None:
        try:
            result = await self._deps.worker.transcribe(request)
        except EngineError as exc:
            self._send(events.transcription_failed(item_id, exc.code, str(exc)))
            return
        timings = {
            **timings,
            "queue_ms": result.queue_ms,
            "engine_ms": result.engine_ms,
            # From the end-of-speech decision to this event leaving the server.
            "server_ms": (time.perf_counter() - decided_at) * 1000,
        }
        self._send(events.transcription_completed(item_id, result.text, timings, result.language))

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
            log.info("call %s ended (%s), %d utterances", self.id, self.end_reason, self.utterances)
            if self._on_closed is not None:
                self._on_closed(self)

    # -- client events -----------------------------------------------------------------

    def _on_message(self, raw: str | bytes) -> None:
        try:
            msg = events.parse_client_event(raw)
        except ProtocolError as exc:
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
            self._language = msg.language or None
        if msg.prompt is not None:
            self._prompt = msg.prompt or None
        if msg.turn_detection_off:
            self._options = replace(self._options, turn_detection=False)
        elif msg.turn_detection is not None:
            td = msg.turn_detection
            self._options = replace(
                self._options,
                turn_detection=True,
                threshold=td.threshold if td.threshold is not None else self._options.threshold,
                prefix_padding_ms=td.prefix_padding_ms
                if td.prefix_padding_ms is not None
                else self._options.prefix_padding_ms,
                min_silence_ms=td.silence_duration_ms
                if td.silence_duration_ms is not None
                else self._options.min_silence_ms,
            )

"""One transcription session, whatever carries it: the only place that knows every stage.

inbound queue (audio chunks, client messages, end; in arrival order) -> ``SpeechDetector``
(VAD + segmenter, on a worker thread) -> ``ItemPipeline`` -> ``EngineWorker`` (shared,
batched) -> OpenAI Realtime events -> the transport's ``EventSink``.

No transport here: ``agent.transports.webrtc`` feeds it from an aiortc track and data channel,
``agent.transports.websocket`` from ``/v1/realtime`` messages, ``agent.transports.twilio``
from one track of a Twilio Media Stream. A transport puts what arrives
on the session's one inbound queue, so client events are handled strictly in the order they
came, between the audio before and after them (a ``session.update`` sent after a ``commit``
cannot change that commit's decode), and it hands the session a sink for its events.

Lifecycle: ``connecting`` (the transport is not carrying media yet) -> ``live`` -> ``draining``
(input ended: the open utterance is flushed to the engine and in-flight transcriptions
finish, up to ``DRAIN_TIMEOUT_S``) -> ``closed``. The session owns its tasks: ``_run`` and one
per decode; ``close()`` cancels and awaits all of them.

Sending is bounded: events wait for the sink in a queue of ``limits.event_queue`` (oldest
dropped), and the sink (``agent.event_sink``) bounds what a client leaves unread to
``limits.channel_buffer_bytes`` for droppable events and ``HARD_FACTOR`` times that for the
rest: past it the session ends (``client_not_reading``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent import events
from agent.audio_formats import InputFormat, PcmDecoder
from agent.config import Config
from agent.detector import DetectorEvent, SpeechDetector
from agent.engines.base import StreamingEngine, StreamText
from agent.engines.worker import EngineWorker
from agent.errors import EngineError, ProtocolError
from agent.event_sink import HARD_FACTOR, EventSink
from agent.items import ENGINE_LAG, ItemPipeline
from agent.observer import AudioLagMeter, CallObserver
from agent.segmenter import SegmenterOptions
from agent.stream_items import StreamItems
from agent.vad import Vad

log = logging.getLogger(__name__)

#: Longest wait for in-flight transcriptions once the session's input has ended.
DRAIN_TIMEOUT_S = 30.0
#: Longest wait for the sink to hand its last events on before the transport closes.
FLUSH_TIMEOUT_S = 1.0
#: Events dropped first when a client does not read. ``error`` too: a client could
#: otherwise have one queued for every bad message it sends.
DROPPABLE = frozenset(
    {f"{events.TRANSCRIPTION}.delta", f"{events.TRANSCRIPTION}.interim", ENGINE_LAG, "error"}
)
#: How far past ``limits.channel_buffer_bytes`` a client that does not read may get.
CHANNEL_BUFFER_HARD_FACTOR = HARD_FACTOR

SessionState = Literal["connecting", "live", "draining", "closed"]


@dataclass(frozen=True)
class SessionDeps:
    """What every session shares: configuration, the engine worker, the VAD, a thread pool."""

    config: Config
    worker: EngineWorker
    vad: Vad
    executor: Executor
    observer: CallObserver = field(default_factory=CallObserver)


# -- what a transport puts on the inbound queue -------------------------------------------


@dataclass(frozen=True, eq=False)
class AudioIn:
    """Decoded audio from a media track: 16 kHz mono float32."""

    samples: npt.NDArray[np.float32]
    #: ``time.perf_counter()`` when the frame carrying these samples was received.
    received_at: float
    #: Counted in the audio-lag metric (not the resampler's tail, which comes late).
    timed: bool = True

    @property
    def size(self) -> int:
        return int(self.samples.nbytes)


@dataclass(frozen=True, eq=False)
class MessageIn:
    """One client message, as received (parsed in order by the session)."""

    raw: str | bytes
    received_at: float

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class EndIn:
    """The input is over: flush, drain, close."""

    reason: str
    size: int = 0


Inbound = AudioIn | MessageIn | EndIn


@dataclass(frozen=True)
class Carriage:
    """How a transport carries a session's audio, for the session to describe and check."""

    #: ``webrtc``, ``websocket`` or ``twilio`` (logs).
    transport: str
    #: The format of ``input_audio_buffer.append`` audio; ``None``: audio comes on a media
    #: track (Opus) and appends are refused.
    input_format: InputFormat | None
    #: Largest client message accepted, in bytes.
    max_message_bytes: int = events.MAX_CLIENT_MESSAGE
    #: Fields added to every event the session sends, and to its log records (a phone
    #: call's ``call_sid`` and ``track``: its subscribers hear several sessions at once).
    event_fields: Mapping[str, str] = field(default_factory=dict)


class TranscriptionSession:
    """One caller's transcription: feed it with ``put_*``/``end``, read it through a sink."""

    def __init__(
        self,
        deps: SessionDeps,
        carriage: Carriage,
        stop_input: Callable[[], None],
        on_closed: Callable[[TranscriptionSession], None] | None = None,
    ) -> None:
        self.id = events.new_id("sess")
        self.carriage = carriage
        self.state: SessionState = "connecting"
        self.end_reason: str | None = None
        self.dropped_events = 0
        self._deps = deps
        self._config = deps.config
        self._stop_input = stop_input
        self._on_closed = on_closed
        self._observer = deps.observer
        self._log = logging.LoggerAdapter(log, {**carriage.event_fields, "call_id": self.id})
        self._options = SegmenterOptions.from_config(deps.config.vad, deps.config.segmenter)
        engine = deps.worker.engine
        # The transcriber goes by the engine's capability: a streaming engine's text comes
        # per frame (no interims, no speculative finals); a whole-utterance engine's from
        # re-decoding the open utterance.
        streaming = isinstance(engine, StreamingEngine)
        self._detector = SpeechDetector(
            deps.vad.stream(),
            self._options,
            0 if streaming else deps.config.engine.interim_interval_ms,
            speculative=deps.config.engine.speculative_final and not streaming,
            # A look between windows brings a pause up to 32 ms sooner for one more VAD run
            # per frame of speech (~3 % of a core a call): worth it only with no hold after.
            peek=deps.config.engine.speculative_hold_ms == 0,
        )
        self._input_format = carriage.input_format
        self._decoder = PcmDecoder(carriage.input_format) if carriage.input_format else None
        self._items: ItemPipeline | StreamItems
        if isinstance(engine, StreamingEngine):
            pre_roll = self._options.prefix_padding_ms
            self._items = StreamItems(engine, self._send, self._observer, self.id, pre_roll)
        else:
            self._items = ItemPipeline(
                deps.worker, self._send, self._spawn, self._observer, self.id
            )
            self._items.deltas = deps.config.engine.interim_interval_ms > 0
            self._items.speculative = deps.config.engine.speculative_final
            self._items.speculative_hold_s = deps.config.engine.speculative_hold_ms / 1000
            self._items.interim_share = deps.config.engine.interim_share
            self._items.final_context = deps.config.engine.final_context
        self._items.language = deps.config.engine.language or None
        self._sink: EventSink | None = None
        #: Events (JSON text, type) sent before a sink is attached.
        self._outbox: deque[tuple[str, str]] = deque(maxlen=deps.config.limits.event_queue)
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        #: Bytes waiting on the inbound queue, and a flag set whenever there is room again.
        self._inbox_bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._ended = False
        self._lag = AudioLagMeter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None
        self._send(events.session_created(self.describe()))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start consuming the inbound queue (and the ``limits.max_call_s`` clock)."""
        self._main = asyncio.create_task(self._run(), name=f"session-{self.id}")
        if isinstance(self._items, StreamItems):
            try:
                self._items.open(self._on_stream_update())
            except EngineError as exc:  # the engine keeps up with no more streams
                self.fail(exc.code, str(exc))
        max_call_s = self._config.limits.max_call_s
        if max_call_s > 0:
            self._expiry = asyncio.get_running_loop().call_later(max_call_s, self._expire)

    def go_live(self) -> None:
        """The transport now carries media."""
        if self.state == "connecting":
            self.state = "live"

    def attach(self, sink: EventSink) -> None:
        """Events go to ``sink`` from now on, those queued before it first."""
        self._sink = sink
        while self._outbox:
            text, type_ = self._outbox.popleft()
            sink.send(text, droppable=False, type_=type_)

    def stop(self, reason: str) -> None:
        """End the session from within: the transport stops its input, which then ends.

        For ``max_duration``, a client that does not read, a refused flood: the open
        utterance is still flushed and its ``completed`` sent.
        """
        self.end_reason = self.end_reason or reason
        self._stop_input()

    def fail(self, code: str, message: str) -> None:
        """A client mistake that ends the session: an ``error`` event, then ``stop``."""
        if self._ended or self.end_reason is not None:
            return
        self._observer.protocol_error(code)
        self._send(events.error(code, message))
        self.stop(code)

    async def close(self) -> None:
        """Cancel whatever still runs, release the sink, mark the session closed
        (idempotent)."""
        if self._main is not None and not self._main.done():
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        await self._cancel_tasks()
        if self._sink is not None:
            await self._sink.close()
        self._mark_closed()

    async def wait_done(self) -> None:
        """Until the inbound queue has ended and the session has flushed and drained."""
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._main)

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
        """Audio of this session run through the VAD so far, in ms of its audio."""
        return self._detector.segmenter.clock_ms

    def _expire(self) -> None:
        self._expiry = None
        self._log.info("session %s reached limits.max_call_s", self.id)
        self.stop("max_duration")

    # -- inbound queue -------------------------------------------------------------------

    def has_room(self) -> bool:
        return self._inbox_bytes < self._config.limits.input_buffer_bytes

    async def put_audio(self, audio: AudioIn) -> None:
        """Queue decoded audio, waiting while the queue is full (a media track's pace)."""
        while not self.has_room() and not self._ended:
            self._room.clear()
            await self._room.wait()
        self._put(audio)

    def put_message(self, raw: str | bytes) -> bool:
        """Queue a client message; ``False`` (not queued) while the queue is full."""
        if not self.has_room():
            return False
        self._put(MessageIn(raw, time.perf_counter()))
        return True

    def end(self, reason: str) -> None:
        """No more input: what is queued is still handled, then flush and drain."""
        if not self._ended:
            self._ended = True
            self._room.set()
            self._inbox.put_nowait(EndIn(reason))

    def _put(self, item: AudioIn | MessageIn) -> None:
        if self._ended:
            return  # input after the end (a late append) is ignored
        self._inbox_bytes += item.size
        self._inbox.put_nowait(item)

    async def _run(self) -> None:
        try:
            while True:
                item = await self._inbox.get()
                if isinstance(item, EndIn):
                    self.end_reason = self.end_reason or item.reason
                    break
                self._inbox_bytes -= item.size
                if self.has_room():
                    self._room.set()
                if isinstance(item, AudioIn):
                    await self._on_audio(item.samples, item.received_at if item.timed else None)
                else:
                    await self._on_message(item.raw, item.received_at)
            self.state = "draining"
            await self._flush_detector()
            if isinstance(self._items, StreamItems):
                await self._items.finish(DRAIN_TIMEOUT_S)
            # Every item is final now: hypotheses still queued would only delay the close
            # (measured: 1.7 s at 6 phone streams, 3.6 s at 8, with every final already out).
            self._items.drop_hypotheses()
            await self._drain()
            if self.end_reason == "max_duration":
                # As OpenAI's Realtime API says it when a session reaches its maximum length.
                limit = self._config.limits.max_call_s
                self._send(events.error("session_expired", f"the call reached {limit:g} s"))
            if self._sink is not None and self._sink.is_open():
                await self._sink.flush(FLUSH_TIMEOUT_S)
        finally:
            self._ended = True
            self._room.set()

    async def _on_audio(self, samples: npt.NDArray[np.float32], received_at: float | None) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self._items, StreamItems):
            self._items.push(samples)  # the whole call's audio, speech or not
        found = await loop.run_in_executor(self._deps.executor, self._detector.process, samples)
        self._items.handle(found)
        if received_at is not None:
            late = self._lag.lag(received_at, len(samples), time.perf_counter())
            self._observer.audio_lag(late)

    async def _flush_detector(self) -> None:
        loop = asyncio.get_running_loop()
        decoder = self._decoder

        def flush() -> list[DetectorEvent]:
            # The resampler's filter tail, so the last few ms are not lost.
            found = self._detector.process(decoder.flush()) if decoder is not None else []
            return found + self._detector.flush()

        self._items.handle(await loop.run_in_executor(self._deps.executor, flush))

    async def _drain(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)

    # -- client messages ------------------------------------------------------------------

    async def _on_message(self, raw: str | bytes, received_at: float) -> None:
        try:
            msg = events.parse_client_event(raw, self.carriage.max_message_bytes)
        except ProtocolError as exc:
            self.refuse(exc.code, str(exc))
            return
        loop = asyncio.get_running_loop()
        if isinstance(msg, events.Append):
            await self._append(msg, received_at)
        elif isinstance(msg, events.SessionUpdate):
            if not self._update_session(msg):
                return
            found = self._detector.segmenter.update(self._options)
            self._items.handle(found)
            describe = self.describe()
            if msg.beta:
                self._send(events.transcription_session_updated(describe))
            else:
                self._send(events.session_updated(describe))
        elif isinstance(msg, events.Commit):
            found = await loop.run_in_executor(self._deps.executor, self._detector.segmenter.commit)
            if not found:
                self.refuse(
                    "input_audio_buffer_commit_empty",
                    "nothing to commit: the buffer holds no speech",
                    event_id=msg.event_id,
                )
            self._items.handle(found)
        elif isinstance(msg, events.Clear):
            self._detector.clear()
            self._items.clear()
            self._send(events.cleared())

    def refuse(self, code: str, message: str, **extra: Any) -> None:
        """An ``error`` event for a client's mistake; the session goes on."""
        self._observer.protocol_error(code)
        self._send(events.error(code, message, **extra))

    async def _append(self, msg: events.Append, received_at: float) -> None:
        decoder = self._decoder
        if decoder is None:
            self.refuse(
                "invalid_request_error",
                "this session's audio arrives on its media track, not in messages",
                event_id=msg.event_id,
            )
            return
        try:
            pcm = base64.b64decode(msg.audio, validate=True)
        except (binascii.Error, ValueError):
            self.refuse(
                "invalid_value", "audio must be base64-encoded bytes", event_id=msg.event_id
            )
            return
        loop = asyncio.get_running_loop()
        samples = await loop.run_in_executor(self._deps.executor, decoder.decode, pcm)
        if len(samples):
            await self._on_audio(samples, received_at)

    def _update_session(self, msg: events.SessionUpdate) -> bool:
        """Apply an update; ``False`` (and an ``error``) if it asks for what we cannot do."""
        if msg.input_format is not None and msg.input_format != self._input_format:
            if self._input_format is None:
                self.refuse(
                    "invalid_value",
                    "this session's audio arrives on its media track: its format is fixed",
                    event_id=msg.event_id,
                )
                return False
            self._input_format = msg.input_format
            self._decoder = PcmDecoder(msg.input_format)
        if msg.language is not None:
            self._items.language = msg.language or None
        if msg.prompt is not None:
            self._items.prompt = msg.prompt or None
        if msg.include_interim is not None:
            self._items.include_interim = msg.include_interim
        if msg.delay_ms is not None:
            if not isinstance(self._items, StreamItems):
                self.refuse(
                    "invalid_value",
                    f"engine {self._deps.worker.engine.name} has no delay_ms",
                    event_id=msg.event_id,
                )
                return False
            try:
                self._items.set_delay(msg.delay_ms, self._on_stream_update())
            except EngineError as exc:
                self.refuse(exc.code, str(exc), event_id=msg.event_id)
                return False
        client_turns = (
            msg.model is not None
            and msg.model.startswith(events.CLIENT_TURN_MODELS)
            and msg.turn_detection is None
        )
        if msg.turn_detection_off or client_turns:
            self._options = replace(self._options, turn_detection=False)
        elif msg.turn_detection is not None:
            td = msg.turn_detection
            self._options = self._options.with_turn_detection(
                td.threshold, td.prefix_padding_ms, td.silence_duration_ms
            )
        return True

    def describe(self) -> events.SessionObject:
        """The ``session`` object of ``session.created`` / ``session.updated``: the GA
        transcription-session fields and, beside them, the beta ones."""
        o = self._options
        turn: events.TurnDetectionObject | None = None
        if o.turn_detection:
            turn = {
                "type": "server_vad",
                "threshold": o.turns.threshold,
                "prefix_padding_ms": o.prefix_padding_ms,
                "silence_duration_ms": o.turns.min_silence_ms,
            }
        transcription: events.TranscriptionObject = {
            "model": self._deps.worker.engine.name,
            "language": self._items.language,
            "prompt": self._items.prompt or "",
        }
        if isinstance(self._items, StreamItems):
            transcription["delay_ms"] = self._items.delay_ms  # extension
        fmt = self._input_format
        return {
            "type": "transcription",
            "id": self.id,
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": fmt.ga if fmt else {"type": "audio/opus", "rate": 48_000},
                    "transcription": transcription,
                    "turn_detection": turn,
                    "noise_reduction": None,
                }
            },
            "include": [],
            "input_audio_format": fmt.beta if fmt else "opus",
            "input_audio_transcription": transcription,
            "turn_detection": turn,
            "include_interim": self._items.include_interim,
        }

    # -- events out ------------------------------------------------------------------------

    def _send(self, event: events.ServerEvent) -> None:
        # A phone call's events carry its call_sid and track, after the event's own fields.
        fields = self.carriage.event_fields
        text = json.dumps({**event, **fields} if fields else event, ensure_ascii=False)
        sink = self._sink
        if sink is None:
            if len(self._outbox) == self._outbox.maxlen:
                self.dropped_events += 1  # oldest goes: the newest state matters most
                self._observer.event_dropped("outbox_full")
            self._outbox.append((text, event["type"]))
            return
        outcome = sink.send(text, droppable=event["type"] in DROPPABLE, type_=event["type"])
        if outcome in ("dropped", "overflow"):
            self.dropped_events += 1
            self._observer.event_dropped("backpressure")
        if outcome == "overflow":
            self._end_not_reading(sink.buffered_amount())

    def _end_not_reading(self, buffered: int) -> None:
        if self.end_reason is not None:
            return  # already on its way out
        self._log.warning(
            "session %s: the client does not read its events (%d bytes unsent): ending it",
            self.id,
            buffered,
        )
        self.stop("client_not_reading")

    # -- tasks -----------------------------------------------------------------------------

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
            self._log.error("session %s: task failed", self.id, exc_info=exc)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _on_stream_update(self) -> Callable[[StreamText], None]:
        """The engine thread's updates, handed to the event loop in their order."""
        loop = asyncio.get_running_loop()
        items = self._items
        assert isinstance(items, StreamItems)

        def on_update(update: StreamText) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
                loop.call_soon_threadsafe(items.receive, update)

        return on_update

    def _mark_closed(self) -> None:
        if isinstance(self._items, StreamItems):
            self._items.close()  # the engine slot is free at once
        if self._closed.is_set():
            return
        self.state = "closed"
        self._closed.set()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._log.info(
            "session %s (%s) ended (%s), %d utterances",
            self.id,
            self.carriage.transport,
            self.end_reason,
            self.utterances,
        )
        self._observer.call_ended(self.end_reason or "closed")
        if self._on_closed is not None:
            self._on_closed(self)

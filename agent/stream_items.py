"""Conversation items from a streaming engine: its text becomes ``delta`` events directly.

The session's whole audio goes through one engine stream (``StreamingEngine.open_stream``),
which sends back the text of every 80 ms frame with the audio time it belongs to. The VAD
and segmenter still cut items; this module joins the two by audio time:

- a frame's text belongs to the item whose speech holds its time (from ``speech_started``'s
  ``audio_start_ms``, pre-roll included, to the utterance's end); text of frames between
  items (silence) is dropped;
- it goes out as an append-only ``delta`` at once: no re-decoding, nothing taken back;
- an item is ``completed`` with its text once the stream has decoded past its end (the
  model's delay after the end of speech), or at the end of the call (the stream is flushed);
- items speak in turn: a later item's deltas wait until the earlier one's ``completed``.

A frame decoded more than one frame late means the engine is behind real time: one
``voxtral.engine_lag`` event per item, as the whole-utterance pipeline sends it.

Engine updates arrive on the engine's thread; ``on_update`` is made thread-safe by the
session (it hops onto the event loop before calling ``receive``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent import events
from agent.detector import DetectorEvent
from agent.engines.base import EngineStream, Samples, StreamingEngine, StreamText
from agent.errors import EngineError
from agent.observer import CallObserver
from agent.segmenter import SpeechStarted, SpeechStopped, Utterance

log = logging.getLogger(__name__)

#: Frames of text kept for an item not cut yet: 40 s, past the longest utterance (30 s).
UNCLAIMED_FRAMES = 500


@dataclass(eq=False)
class _Item:
    item_id: str
    start_ms: int
    end_ms: int | None = None
    text: str = ""
    committed_at: float | None = None
    audio_s: float = 0.0
    held: list[events.Event] = field(default_factory=list)
    lag_sent: bool = False


class StreamItems:
    """Items of one session over a streaming engine (same surface as ``ItemPipeline``)."""

    def __init__(
        self,
        engine: StreamingEngine,
        send: Callable[[events.Event], None],
        observer: CallObserver | None = None,
        call_id: str = "",
        pre_roll_ms: int = 0,
    ) -> None:
        self._engine = engine
        #: Frames this long before the VAD's speech onset belong to the item (its pre-roll).
        self._pre_roll_ms = pre_roll_ms
        self._send = send
        self._observer = observer or CallObserver()
        self._call_id = call_id
        self._stream: EngineStream | None = None
        self._open: dict[int, _Item] = {}
        #: Items not completed yet, oldest first; only the first one's deltas go out now.
        self._turns: deque[_Item] = deque()
        self._last_item_id: str | None = None
        self._last_end_ms = 0
        #: Frames' text no item held yet (start_ms, text): with turn detection off an item
        #: exists only from its commit, and claims the text of its audio then.
        self._unclaimed: deque[tuple[int, str]] = deque(maxlen=UNCLAIMED_FRAMES)
        #: Audio the stream has decoded through, in ms of the session's audio.
        self.decoded_ms = 0
        self.pushed = 0
        self.language: str | None = None
        self.prompt: str | None = None
        self.include_interim = False
        self.deltas = True
        self.speculative = False
        self.utterances = 0
        self.delay_ms = engine.default_delay_ms
        self._done = asyncio.Event()
        #: The engine failed the stream (its code): later items fail at their commit.
        self._failed: str | None = None

    # -- the stream ----------------------------------------------------------------------

    def open(self, on_update: Callable[[StreamText], None]) -> None:
        """Open the engine stream. Raises ``EngineError`` (``too_many_calls``) if refused."""
        self._stream = self._engine.open_stream(on_update, self.language, self.delay_ms)

    def set_delay(self, delay_ms: int, on_update: Callable[[StreamText], None]) -> None:
        """A session's own delay: only before its audio starts (a stream's delay is fixed)."""
        self._engine.check_delay(delay_ms)
        if delay_ms == self.delay_ms:
            return
        if self.pushed:
            raise EngineError("delay_ms can only change before the audio starts", "invalid_value")
        old, self._stream = self._stream, None
        if old is not None:
            old.close()
        self.delay_ms = delay_ms
        self.open(on_update)

    def push(self, samples: Samples) -> None:
        if self._stream is not None:
            self._stream.push(samples)
            self.pushed += 1

    async def finish(self, timeout_s: float) -> None:
        """End of the call: flush the stream, wait for its last frame, complete every item."""
        if self._stream is not None and not self._done.is_set():
            self._stream.flush()
            try:
                await asyncio.wait_for(self._done.wait(), timeout_s)
            except TimeoutError:
                log.warning("call %s: the stream did not finish in %g s", self._call_id, timeout_s)
        self.decoded_ms = 1 << 62
        self._complete_ready()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def receive(self, update: StreamText) -> None:
        """One frame's text (on the event loop, in audio order)."""
        if update.error is not None:
            self._fail_all(update.error)
            self._done.set()
            return
        item = self._item_at(update.start_ms)
        if item is None and update.text:
            self._unclaimed.append((update.start_ms, update.text))
        if item is not None:
            if update.text:
                item.text += update.text
                self._emit(item, events.transcription_delta(item.item_id, update.text))
            if update.lag_ms > self._engine.frame_ms and not item.lag_sent:
                item.lag_sent = True  # not held: it says the engine is late, not what was said
                self._send(events.engine_lag(item.item_id, update.lag_ms, int(update.lag_ms // 80)))
        self.decoded_ms = max(self.decoded_ms, update.end_ms)
        self._complete_ready()
        if update.done:
            self._done.set()

    # -- detector events -----------------------------------------------------------------

    def handle(self, found: Sequence[DetectorEvent]) -> None:
        for ev in found:
            if isinstance(ev, SpeechStarted):
                item = self._open.get(ev.index)
                if item is None:
                    start = max(0, ev.start_ms - self._pre_roll_ms, self._last_end_ms)
                    item = self._open[ev.index] = _Item(events.new_id("item"), start)
                    self._turns.append(item)
                self._send(events.speech_started(item.item_id, ev.start_ms))
            elif isinstance(ev, SpeechStopped):
                item = self._open.get(ev.index) or self._orphan(ev.end_ms)
                self._send(events.speech_stopped(item.item_id, ev.end_ms))
            elif isinstance(ev, Utterance):
                self._commit(ev)
        self._complete_ready()

    def _orphan(self, start_ms: int) -> _Item:
        item = _Item(events.new_id("item"), start_ms)
        self._turns.append(item)
        return item

    def _commit(self, utt: Utterance) -> None:
        item = self._open.pop(utt.index, None)
        claimed = ""
        if item is None:  # a client commit with no speech_started (turn detection off)
            item = self._orphan(utt.audio_start_ms)
            claimed = self._claim(item.start_ms, utt.end_ms)
        item.end_ms = utt.end_ms
        self._last_end_ms = max(self._last_end_ms, utt.end_ms)
        item.committed_at = time.perf_counter()
        item.audio_s = len(utt.audio) / 16_000
        self._send(events.committed(item.item_id, self._last_item_id))
        self._last_item_id = item.item_id
        self.utterances += 1
        self._observer.utterance_committed()
        if self._failed is not None:
            self._fail_all(self._failed)
        elif claimed:
            item.text += claimed
            self._emit(item, events.transcription_delta(item.item_id, claimed))

    def _claim(self, start_ms: int, end_ms: int) -> str:
        """The text of frames in ``[start_ms, end_ms)`` decoded before their item existed."""
        kept = [(t, text) for t, text in self._unclaimed if t >= end_ms]
        claimed = "".join(text for t, text in self._unclaimed if start_ms <= t < end_ms)
        self._unclaimed = deque(kept, maxlen=UNCLAIMED_FRAMES)
        return claimed

    def clear(self) -> None:
        """``input_audio_buffer.clear``: the open item is abandoned (its text dropped)."""
        self._unclaimed.clear()
        for index in list(self._open):
            item = self._open.pop(index)
            if item in self._turns:
                self._turns.remove(item)
        self._release_held()

    def drop_hypotheses(self) -> None:
        """Nothing to withdraw: a stream has no hypotheses."""

    # -- items in turn ---------------------------------------------------------------------

    def _item_at(self, ms: int) -> _Item | None:
        for item in reversed(self._turns):
            if item.start_ms <= ms and (item.end_ms is None or ms < item.end_ms):
                return item
        return None

    def _emit(self, item: _Item, event: events.Event) -> None:
        if self._turns and self._turns[0] is item:
            self._send(event)
        else:
            item.held.append(event)

    def _complete_ready(self) -> None:
        while self._turns:
            head = self._turns[0]
            if head.end_ms is None or self.decoded_ms < head.end_ms:
                return
            self._turns.popleft()
            self._complete(head)
            self._release_held()

    def _release_held(self) -> None:
        if self._turns:
            head = self._turns[0]
            held, head.held = head.held, []
            for event in held:
                self._send(event)

    def _fail_all(self, code: str) -> None:
        """The engine failed the stream: committed items not completed yet fail, in turn;
        one still open fails at its commit."""
        self._failed = code
        self._stream = None
        while self._turns and self._turns[0].end_ms is not None:
            item = self._turns.popleft()
            for event in item.held:
                self._send(event)
            self._observer.transcription_failed(code)
            self._send(events.transcription_failed(item.item_id, code, "the engine failed"))
        self._release_held()

    def _complete(self, item: _Item) -> None:
        assert item.end_ms is not None
        server_ms = (time.perf_counter() - (item.committed_at or time.perf_counter())) * 1000
        timings: events.Timings = {
            "speech_end_ms": float(item.end_ms),
            "delay_ms": float(self.delay_ms),
            "server_ms": server_ms,
        }
        self._send(
            events.transcription_completed(
                item.item_id, item.text.strip(), timings, audio_s=item.audio_s
            )
        )
        self._observer.final_completed(server_ms / 1000)

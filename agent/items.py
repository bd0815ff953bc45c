"""One conversation item per utterance: live deltas, speculative final, ``completed``.

Takes the detector's events for one call and turns them into engine requests and wire events:

- ``speech_started`` opens an item. While it is open, ``InterimDue`` re-transcribes its audio
  so far (at interim priority; one hypothesis in flight per call, a withdrawn speculative
  decode included, so the other lane stays free for finals); words two consecutive hypotheses agree
  on go out as append-only ``delta`` events (LocalAgreement-2).
- ``SpeechPaused`` starts the final decode speculatively, before the hangover has confirmed
  the end. ``SpeechResumed`` withdraws it: one still queued is cancelled, one the engine has
  taken becomes the interim hypothesis; while that one still runs, the next pause waits
  ``HOLD_S`` before decoding again. When the utterance is cut on that same silence the
  speculative decode *is* the final: reused, never repeated, so ``completed`` follows the
  hangover at once if the decode already finished.
- ``completed`` carries the authoritative text; a last ``delta`` first completes the deltas
  when the final extends what was already sent. Its extension field ``lag_ms`` is the
  engine's backlog when it left: how long the oldest final still queued had waited (0 when
  the engine keeps up).
- A final still unanswered ``LAG_NOTICE_S`` after its commit while the engine's backlog is
  that long gets one extension event ``voxtral.engine_lag`` ``{item_id, lag_ms,
  queue_depth}``: the engine is behind real time, the transcript will be late.
- Items speak in turn: an item's transcription events (deltas, interims,
  ``completed``/``failed``) wait until every earlier item has its ``completed`` or
  ``failed`` out, so a client keeping one running string (LiveKit's plugin) never sees the
  next item's words before the last one's final. Audio events (speech started/stopped,
  ``committed``) and lag notices are never held.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import events
from agent.agreement import LocalAgreement
from agent.clock import Clock, finished_within
from agent.detector import DetectorEvent, InterimDue
from agent.engines.base import EngineRequest, SpokenBefore
from agent.engines.worker import EngineWorker, Priority, Transcription
from agent.errors import EngineError
from agent.observer import CallObserver
from agent.segmenter import SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped, Utterance

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]

log = logging.getLogger(__name__)

#: A final unanswered this long, with the engine's backlog as long, sends ``engine_lag``.
LAG_NOTICE_S = 1.0
#: While a withdrawn speculative decode of the same item still runs, a new pause must last
#: this long (three VAD windows) before its own decode goes on the engine.
HOLD_S = 0.096
ENGINE_LAG = "voxtral.engine_lag"
#: A final behind the utterance before it is also conditioned on the texts of this many
#: finals before that one (``SpokenBefore.earlier``). Read speech turn by turn, six files
#: of 6416 words (``bench/offline_wer.py --turns-only --earlier N``, docs/benchmarks.md):
#: 8.9 % WER against 9.6 % with none, for ~5 % more decoding CPU. Three or ten did no
#: better; all of the call's text (up to Whisper's 223 prompt tokens) was worse than none.
EARLIER_FINALS = 5
#: Until its first delta, an item's interims go at the detector's pace (for up to this many
#: hypotheses): the agreement needs two that agree, and the first words are the ones a
#: listener waits for. After that, ``interim_share`` spaces them. Six rather than four: on
#: read8 over the WebSocket the first delta's p95 came at 1613 against 2084 ms (turns whose
#: first words the model kept changing waited for spaced interims), at the same CPU, words
#: and deltas the final contradicts (22 against 21 of 91 items; docs/benchmarks.md).
EAGER_HYPOTHESES = 6
#: ... and never more than this apart: on a long turn each re-decode costs more (its whole
#: audio so far), and words every few seconds are still worth that.
INTERIM_MAX_GAP_S = 2.0


@dataclass(eq=False)
class _Item:
    item_id: str
    agreement: LocalAgreement = field(default_factory=LocalAgreement)
    interim: asyncio.Task[None] | None = None
    speculation: asyncio.Task[Transcription] | None = None
    speculation_ms: int = 0  # audio time of the pause that started ``speculation``
    speculation_started: asyncio.Event = field(default_factory=asyncio.Event)  # on the engine
    withdrawn: asyncio.Task[Transcription] | None = None  # the last withdrawn speculation
    hypotheses: int = 0  # interim results fed to the agreement
    next_interim_at: float = 0.0  # the clock's time before which no interim starts
    finalising: bool = False
    stopped_at: float | None = None
    decided_ms: int | None = None
    #: Transcription events waiting for earlier items to finish.
    held: list[events.Event] = field(default_factory=list)
    #: Its ``completed`` or ``failed`` is out (or held), or it was cleared.
    done: bool = False


class SpokenHistory:
    """A call's finals that said words, as the next final's ``EngineRequest.before``: the
    last one (its audio and text) with the texts of up to ``earlier`` finals before it,
    oldest first. ``bench/offline_wer.py`` keeps its turns' with the same rule (live, the
    item pipeline also uses ``last`` only when it is the utterance just before)."""

    def __init__(self, earlier: int = EARLIER_FINALS) -> None:
        self.last: SpokenBefore | None = None
        self._earlier: deque[str] = deque(maxlen=earlier)

    def add(self, audio: Any, text: str) -> bool:
        """A final came back: kept (True) unless it said no words."""
        if not text.strip():
            return False
        if self.last is not None:
            self._earlier.append(self.last.text.strip())
        self.last = SpokenBefore(audio, text, " ".join(self._earlier))
        return True


class ItemPipeline:
    def __init__(
        self,
        worker: EngineWorker,
        send: Callable[[events.Event], None],
        spawn: Spawn,
        observer: CallObserver | None = None,
        call_id: str = "",
        clock: Clock | None = None,
    ):
        self._worker = worker
        #: Holds, lag notices and server time: the worker's clock unless given.
        self._clock = clock or worker.clock
        self._send = send
        self._spawn = spawn
        self._observer = observer or CallObserver()
        self._call_id = call_id
        self._open: dict[int, _Item] = {}
        #: Items not finished yet, oldest first; only the first one's events go out now.
        self._turns: deque[_Item] = deque()
        self._last_item_id: str | None = None
        self.language: str | None = None
        self.prompt: str | None = None
        #: Finals go to the engine with the utterance before them (``EngineRequest.before``).
        self.final_context = True
        #: The finals that came back with words: the next utterance's final is decoded
        #: behind the last of them (``EngineRequest.before``), utterance ``_spoken_number``.
        self._spoken = SpokenHistory()
        self._spoken_number = 0
        self.include_interim = False
        #: Interims of one item take at most this share of the time (the engine's share of a
        #: core on the embedded engine): after a hypothesis that took ``d`` s of engine time,
        #: the next starts ``d / share`` s after it began (``EAGER_HYPOTHESES`` excepted).
        #: 0: no bound.
        self.interim_share = 0.0
        #: With interims off there are no deltas at all, not even the final's.
        self.deltas = True
        #: Decode on the first silence instead of waiting for the hangover.
        self.speculative = True
        #: A pause must last this long before its speculative decode goes on the engine.
        self.speculative_hold_s = 0.0
        self.utterances = 0
        self.speculations_reused = 0
        self.speculations_dropped = 0

    def handle(self, found: Sequence[DetectorEvent]) -> None:
        for ev in found:
            if isinstance(ev, SpeechStarted):
                item = self._open.get(ev.index) or self._new_item(ev.index)
                self._send(events.speech_started(item.item_id, ev.start_ms))
            elif isinstance(ev, InterimDue):
                self._interim(ev)
            elif isinstance(ev, SpeechPaused):
                self._speculate(ev)
            elif isinstance(ev, SpeechResumed):
                self._withdraw_speculation(self._open.get(ev.index))
            elif isinstance(ev, SpeechStopped):
                item = self._open[ev.index]
                item.stopped_at, item.decided_ms = self._clock.now(), ev.decided_ms
                self._send(events.speech_stopped(item.item_id, ev.end_ms))
            elif isinstance(ev, Utterance):
                self._commit(ev)

    def clear(self) -> None:
        """``input_audio_buffer.clear``: the open item is abandoned with its decodes."""
        for index in [i for i, item in self._open.items() if not item.finalising]:
            item = self._open.pop(index)
            self._drop_speculation(item)
            for task in (item.interim, item.withdrawn):
                if task is not None:
                    task.cancel()
            self._finished(item, abandoned=True)

    def drop_hypotheses(self) -> None:
        """The input has ended: interim decodes not yet answered are withdrawn (one still
        queued leaves the engine's queue); the finals are what remains to wait for."""
        for item in self._turns:
            for task in (item.interim, item.withdrawn):
                if task is not None and not task.done():
                    task.cancel()

    # -- one item's events at a time ---------------------------------------------------

    def _new_item(self, index: int | None = None) -> _Item:
        item = _Item(events.new_id("item"))
        if index is not None:
            self._open[index] = item
        self._turns.append(item)
        return item

    def _emit(self, item: _Item, event: events.Event) -> None:
        """Send a transcription event now if ``item`` has the turn, else hold it."""
        if self._turns and self._turns[0] is item:
            self._send(event)
        else:
            item.held.append(event)

    def _finished(self, item: _Item, abandoned: bool = False) -> None:
        """``item`` has said its last (or was abandoned by a clear): once it is first, the
        next items have their turn, in order, each sending what it held meanwhile."""
        item.done = True
        if item not in self._turns:
            return
        if abandoned:
            item.held.clear()
        elif self._turns[0] is not item:
            return  # its events, ``completed`` included, wait for the items before it
        was_first = self._turns[0] is item
        self._turns.remove(item)
        while was_first and self._turns:
            head = self._turns[0]
            held, head.held = head.held, []
            for event in held:
                self._send(event)
            if not head.done:
                break  # the new first item still speaks: its next events go out directly
            self._turns.popleft()

    def _request(self, audio: Any, draft: bool = False) -> EngineRequest:
        """An interim's draft, or the next utterance's final: behind the utterance just
        before it when that one's text is back (it usually is: a final takes ~0.3 s, a turn
        lasts seconds)."""
        before = None
        if not draft and self.final_context and self._spoken_number == self.utterances:
            before = self._spoken.last
        return EngineRequest(
            audio, language=self.language, prompt=self.prompt, draft=draft, before=before
        )

    # -- interims -----------------------------------------------------------------------

    def _interim(self, due: InterimDue) -> None:
        item = self._open.get(due.index)
        if item is None or item.finalising or _running(item.interim) or _running(item.withdrawn):
            # One hypothesis in flight per call (an interim or a withdrawn speculation): a
            # slow engine just gets fewer, and the other lane stays free for the final.
            return
        eager = not item.agreement.committed and item.hypotheses < EAGER_HYPOTHESES
        if not eager and self._clock.now() < item.next_interim_at:
            # Each interim re-decodes the whole utterance so far, so its cost grows with the
            # utterance: spacing them by their own measured time bounds a call's interim CPU
            # (and backs off by itself when the engine is loaded and decodes slow down).
            return
        request = self._request(due.audio, draft=True)
        decode = self._worker.transcribe(request, Priority.INTERIM)
        item.interim = self._spawn(self._run_interim(item, decode))

    async def _run_interim(self, item: _Item, decode: Awaitable[Transcription]) -> None:
        try:
            result = await decode
        except EngineError:
            return  # skipped under load or failed: the final is what counts
        if self.interim_share > 0:
            # Its engine time (longer when the engine is loaded) sets the next one's start.
            spent_s = result.engine_ms / 1000
            gap_s = min(spent_s * (1 / self.interim_share - 1), INTERIM_MAX_GAP_S - spent_s)
            item.next_interim_at = self._clock.now() + gap_s
        if item.finalising:
            return  # the final already owns this item's text
        item.hypotheses += 1
        delta = item.agreement.update(result.text)
        if delta:
            self._emit(item, events.transcription_delta(item.item_id, delta))
        if self.include_interim:
            self._emit(item, events.transcription_interim(item.item_id, result.text))

    # -- speculative final --------------------------------------------------------------

    def _speculate(self, pause: SpeechPaused) -> None:
        item = self._open.get(pause.index)
        if item is None or not self.speculative:
            return
        self._drop_speculation(item)
        request = self._request(pause.audio)
        item.speculation_started = started = asyncio.Event()
        # Each pause decodes the whole utterance so far, and a decode cannot be stopped once
        # the engine has it. Read speech dips under the VAD threshold between many words;
        # decoding each dip cost more CPU than all the finals (docs/benchmarks.md), so a
        # pause must last ``speculative_hold_s`` first: a dip is over by then, an end is
        # not. While an earlier withdrawn one still runs, at least ``HOLD_S``: such decodes
        # would otherwise stack on every lane and the real end's final queue behind them.
        hold_s = self.speculative_hold_s
        if _running(item.withdrawn):
            hold_s = max(hold_s, HOLD_S)
        item.speculation = self._spawn(self._decode_final(request, started, hold_s))
        item.speculation_ms = pause.at_ms + round(hold_s * 1000)

    async def _decode_final(
        self, request: EngineRequest, started: asyncio.Event, hold_s: float
    ) -> Transcription:
        if hold_s:
            await self._clock.sleep(hold_s)  # cancelled here by a resume: nothing was queued
        return await self._worker.transcribe(request, Priority.FINAL, started)

    def _withdraw_speculation(self, item: _Item | None) -> None:
        """Speech resumed, so the speculative decode is not the final."""
        if item is None or item.speculation is None:
            return
        if not item.speculation_started.is_set():
            self._drop_speculation(item)  # still waiting: withdrawn before it cost anything
            return
        # The engine has it and will finish it whatever happens here. It is a transcript of
        # the audio so far, so it becomes the interim hypothesis (the detector skipped this
        # interval's interim for it) when no other is in flight, rather than waste.
        item.withdrawn, item.speculation = item.speculation, None
        self.speculations_dropped += 1
        if self.deltas and not _running(item.interim):
            item.interim = self._spawn(self._run_interim(item, item.withdrawn))

    def _drop_speculation(self, item: _Item | None) -> None:
        if item is not None and item.speculation is not None:
            if not item.speculation.done():
                item.speculation.cancel()  # withdrawn from the queue if not started yet
            item.speculation = None
            self.speculations_dropped += 1

    # -- final --------------------------------------------------------------------------

    def _commit(self, utt: Utterance) -> None:
        item = self._open.pop(utt.index, None) or self._new_item()
        item.finalising = True
        self._send(events.committed(item.item_id, self._last_item_id))
        self._last_item_id = item.item_id
        decided_at = item.stopped_at if item.stopped_at is not None else self._clock.now()
        decided_ms = item.decided_ms if item.decided_ms is not None else utt.end_ms
        final = item.speculation if utt.cut == "silence" else None
        if final is None:
            self._drop_speculation(item)
            final = self._spawn(self._worker.transcribe(self._request(utt.audio)))
        else:
            self.speculations_reused += 1
        self.utterances += 1  # after the request: it is behind the utterance before this one
        self._observer.utterance_committed()
        speculative = final is item.speculation
        timings: events.Timings = {
            "speech_end_ms": float(utt.end_ms),
            "vad_ms": float(decided_ms - utt.end_ms),
            # Audio time from the end of speech to the start of the final decode.
            "decode_after_ms": float(
                (item.speculation_ms if speculative else decided_ms) - utt.end_ms
            ),
            # The engine's figures and the time to send, once the final is back.
            "queue_ms": 0.0,
            "engine_ms": 0.0,
            "server_ms": 0.0,
        }
        self._spawn(
            self._complete(item, final, timings, decided_at, speculative, self.utterances, utt)
        )

    async def _complete(
        self,
        item: _Item,
        final: asyncio.Task[Transcription],
        timings: events.Timings,
        decided_at: float,
        speculative: bool,
        number: int,
        utt: Utterance,
    ) -> None:
        """Sends the final of ``utt``, the call's utterance ``number``, once it is back."""
        try:
            done = await finished_within(self._clock, final, LAG_NOTICE_S)
            lag_ms = self._worker.lag_ms()
            if not done and lag_ms >= LAG_NOTICE_S * 1000:
                # Not held behind earlier items: it says the engine is late, not what was said.
                self._send(events.engine_lag(item.item_id, lag_ms, self._worker.queue_depth))
            try:
                result = await final
            except EngineError as exc:
                log.warning(
                    "call %s item %s: transcription failed (%s)",
                    self._call_id,
                    item.item_id,
                    exc.code,
                    extra={"call_id": self._call_id, "item_id": item.item_id},
                )
                self._observer.transcription_failed(exc.code)
                self._emit(item, events.transcription_failed(item.item_id, exc.code, str(exc)))
                return
            tail = item.agreement.finish(result.text) if self.deltas else ""
            if tail:
                self._emit(item, events.transcription_delta(item.item_id, tail))
            timings["queue_ms"] = result.queue_ms
            timings["engine_ms"] = result.engine_ms
            # From the end-of-speech decision to this event leaving the server.
            timings["server_ms"] = (self._clock.now() - decided_at) * 1000
            completed = events.transcription_completed(
                item.item_id,
                result.text,
                timings,
                result.language,
                speculative=speculative,
                audio_s=len(utt.audio) / 16_000,
            )
            completed["lag_ms"] = round(self._worker.lag_ms(), 1)
            if number > self._spoken_number and self._spoken.add(utt.audio, result.text):
                self._spoken_number = number
            self._emit(item, completed)
            self._observer.final_completed((timings["vad_ms"] + timings["server_ms"]) / 1000)
        finally:
            self._finished(item)


def _running(task: asyncio.Task[Any] | None) -> bool:
    return task is not None and not task.done()

"""Cut a call's audio into utterances from per-window speech probabilities.

Synchronous, no I/O, no clock: time is the count of 32 ms windows pushed, so a scripted list
of probabilities drives it exactly (tests do). It implements the OpenAI ``server_vad`` turn
detection: hysteresis (speech starts at ``threshold``, continues down to ``threshold - 0.15``),
a minimum speech length before ``speech_started`` (a short blip is dropped silently), a
hangover of ``min_silence_ms`` before ``speech_stopped``, pre-roll (``prefix_padding_ms``)
kept in front of the onset, and a forced cut at the maximum utterance length. With turn
detection off, audio accumulates until the client commits.

Inside confirmed speech, the first silent window emits ``SpeechPaused`` so the final decode
can start before the hangover ends. ``peek`` lets that pause come sooner, from a look at the
audio that arrived since the last whole window; times and cuts stay on the window grid.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.config import SegmenterConfig, VadConfig
from agent.vad import WINDOW_MS, WINDOW_SAMPLES

NEG_THRESHOLD_GAP = 0.15  # Silero's own hysteresis: speech ends below threshold - 0.15

Cut = Literal["silence", "max_length", "commit", "end_of_call"]


@dataclass(frozen=True)
class SegmenterOptions:
    """Turn detection settings; ``turn_detection=False`` means client-driven commits."""

    threshold: float = 0.5
    min_speech_ms: int = 100
    min_silence_ms: int = 200
    prefix_padding_ms: int = 300
    max_utterance_ms: int = 30_000
    turn_detection: bool = True

    @classmethod
    def from_config(cls, vad: VadConfig, segmenter: SegmenterConfig) -> SegmenterOptions:
        return cls(
            threshold=vad.threshold,
            min_speech_ms=segmenter.min_speech_ms,
            min_silence_ms=segmenter.min_silence_ms,
            prefix_padding_ms=segmenter.prefix_padding_ms,
            max_utterance_ms=int(segmenter.max_utterance_s * 1000),
        )

    def with_turn_detection(
        self,
        threshold: float | None = None,
        prefix_padding_ms: int | None = None,
        silence_ms: int | None = None,
    ) -> SegmenterOptions:
        """Server VAD on, with the given settings changed (``None`` keeps the current one)."""
        changes: dict[str, float | int | bool] = {"turn_detection": True}
        if threshold is not None:
            changes["threshold"] = threshold
        if prefix_padding_ms is not None:
            changes["prefix_padding_ms"] = prefix_padding_ms
        if silence_ms is not None:
            changes["min_silence_ms"] = silence_ms
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - NEG_THRESHOLD_GAP, 0.01)


@dataclass(frozen=True)
class SpeechStarted:
    index: int
    #: Audio time of the first speech window (ms since the call's first frame).
    start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    index: int
    #: Audio time where speech ended (end of the last speech window).
    end_ms: int
    #: Audio time at which the stop was decided (after the hangover).
    decided_ms: int


@dataclass(frozen=True, eq=False)
class SpeechPaused:
    """Silence began inside confirmed speech: the region's audio so far, for a speculative
    final decode that is used if the hangover completes and dropped if speech resumes."""

    index: int
    audio: npt.NDArray[np.float32]
    at_ms: int


@dataclass(frozen=True)
class SpeechResumed:
    """Speech came back before the hangover ended: any speculation on the pause is void."""

    index: int


@dataclass(frozen=True, eq=False)
class Utterance:
    """One cut of audio ready for the engine. ``audio`` includes pre-roll and hangover."""

    index: int
    audio: npt.NDArray[np.float32]
    audio_start_ms: int
    start_ms: int
    end_ms: int
    cut: Cut


SegmenterEvent = SpeechStarted | SpeechPaused | SpeechResumed | SpeechStopped | Utterance


class Segmenter:
    # The open speech region, (re)set by _reset_region.
    _active: bool
    _confirmed: bool
    _index: int
    _audio: list[npt.NDArray[np.float32]]
    _audio_start_ms: int
    _onset_ms: int
    _last_speech_end_ms: int
    _silence_run_ms: int
    _peeked_pause: bool  # SpeechPaused already sent from a peek, not yet confirmed by a window

    def __init__(self, options: SegmenterOptions) -> None:
        self.options = options
        self._clock_ms = 0
        self._next_index = 0
        pre_roll_windows = -(-options.prefix_padding_ms // WINDOW_MS)
        self._ring: deque[npt.NDArray[np.float32]] = deque(maxlen=pre_roll_windows)
        self._reset_region()

    @property
    def clock_ms(self) -> int:
        return self._clock_ms

    @property
    def in_speech(self) -> bool:
        """True between ``speech_started`` and ``speech_stopped``."""
        return self._confirmed

    @property
    def open_index(self) -> int:
        """Index of the confirmed open utterance, or -1."""
        return self._index if self._confirmed else -1

    @property
    def paused(self) -> bool:
        """Inside confirmed speech, but in a silence that may become its end."""
        return self._confirmed and (self._silence_run_ms > 0 or self._peeked_pause)

    @property
    def can_pause(self) -> bool:
        """Confirmed speech under server VAD, not paused yet: what a ``peek`` may pause."""
        return self.options.turn_detection and self._confirmed and not self.paused

    def open_audio(self) -> npt.NDArray[np.float32]:
        """The open utterance's audio so far (pre-roll included), for interim decodes."""
        return np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)

    def update(self, options: SegmenterOptions) -> list[SegmenterEvent]:
        """Apply new settings (``session.update``); an open utterance is kept."""
        events: list[SegmenterEvent] = []
        if options.turn_detection != self.options.turn_detection:
            # Switching modes ends whatever the old mode had open rather than mixing rules.
            events = self._finish("commit") if self._has_audio() else []
            self._reset_region()
        self.options = options
        pre_roll_windows = -(-options.prefix_padding_ms // WINDOW_MS)
        self._ring = deque(self._ring, maxlen=pre_roll_windows)
        return events

    def push(self, window: npt.NDArray[np.float32], probability: float) -> list[SegmenterEvent]:
        """Feed one 32 ms window and its speech probability; returns what it completes."""
        if len(window) != WINDOW_SAMPLES:
            raise ValueError(f"expected {WINDOW_SAMPLES} samples, got {len(window)}")
        t0 = self._clock_ms
        self._clock_ms += WINDOW_MS
        if not self.options.turn_detection:
            return self._push_manual(window, t0)
        return self._push_vad(window, probability, t0)

    def peek(self, probability: float, tail: npt.NDArray[np.float32]) -> list[SegmenterEvent]:
        """A look at ``tail``, the samples since the last whole window (``probability`` from
        ``VadStream.peek``): if confirmed speech already sounds silent there, pause now rather
        than when the window completes, up to 32 ms later. The next whole window confirms the
        pause (no second ``SpeechPaused``) or resumes speech (``SpeechResumed``)."""
        if not self.can_pause or probability >= self.options.neg_threshold:
            return []
        self._peeked_pause = True
        at_ms = self._clock_ms + len(tail) * WINDOW_MS // WINDOW_SAMPLES
        return [SpeechPaused(self._index, np.concatenate([*self._audio, tail]), at_ms)]

    def commit(self) -> list[SegmenterEvent]:
        """Cut now (``input_audio_buffer.commit``). Empty list when there is nothing to cut."""
        if not self._has_audio() or (self.options.turn_detection and not self._confirmed):
            return []
        return self._finish("commit")

    def clear(self) -> None:
        """Drop the open utterance and the pre-roll (``input_audio_buffer.clear``)."""
        self._ring.clear()
        self._reset_region()

    def flush(self) -> list[SegmenterEvent]:
        """End of the call: hand over whatever speech is open so no word is lost."""
        if not self._has_audio() or (self.options.turn_detection and not self._confirmed):
            return []
        return self._finish("end_of_call")

    # -- internals ---------------------------------------------------------------------

    def _push_manual(self, window: npt.NDArray[np.float32], t0: int) -> list[SegmenterEvent]:
        if not self._audio:
            self._audio_start_ms = t0
            self._onset_ms = t0
        self._audio.append(window)
        self._last_speech_end_ms = self._clock_ms
        if self._full():
            return self._finish("max_length")
        return []

    def _push_vad(
        self, window: npt.NDArray[np.float32], probability: float, t0: int
    ) -> list[SegmenterEvent]:
        opts = self.options
        events: list[SegmenterEvent] = []
        if not self._active:
            if probability < opts.threshold:
                self._ring.append(window)
                return events
            self._active = True
            self._onset_ms = t0
            self._audio = list(self._ring)
            self._audio_start_ms = t0 - WINDOW_MS * len(self._ring)
            self._ring.clear()
            self._silence_run_ms = 0
        self._audio.append(window)
        if probability >= opts.neg_threshold:
            if self.paused:
                events.append(SpeechResumed(self._index))
            self._last_speech_end_ms = self._clock_ms
            self._silence_run_ms = 0
            self._peeked_pause = False
        else:
            self._silence_run_ms += WINDOW_MS
            if (
                self._confirmed
                and self._silence_run_ms == WINDOW_MS
                and self._silence_run_ms < opts.min_silence_ms
                and not self._peeked_pause
            ):
                events.append(SpeechPaused(self._index, self.open_audio(), self._clock_ms))
        if not self._confirmed and self._last_speech_end_ms - self._onset_ms >= opts.min_speech_ms:
            self._confirmed = True
            self._index = self._next_index
            self._next_index += 1
            events.append(SpeechStarted(self._index, self._onset_ms))
        if self._silence_run_ms >= opts.min_silence_ms:
            if self._confirmed:
                events.extend(self._finish("silence"))
            else:
                # A blip shorter than min_speech_ms: never announced, its audio becomes
                # pre-roll for whatever comes next.
                for w in self._audio:
                    self._ring.append(w)
                self._reset_region()
        elif self._confirmed and self._full():
            events.extend(self._finish("max_length"))
        return events

    def _finish(self, cut: Cut) -> list[SegmenterEvent]:
        events: list[SegmenterEvent] = []
        if self._index < 0:
            self._index = self._next_index
            self._next_index += 1
        end_ms = self._clock_ms if cut == "max_length" else self._last_speech_end_ms
        if self.options.turn_detection:
            events.append(SpeechStopped(self._index, end_ms, self._clock_ms))
        audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        events.append(
            Utterance(
                index=self._index,
                audio=audio.astype(np.float32, copy=False),
                audio_start_ms=self._audio_start_ms,
                start_ms=self._onset_ms,
                end_ms=end_ms,
                cut=cut,
            )
        )
        self._reset_region()
        return events

    def _full(self) -> bool:
        """Would one more window overflow ``max_utterance_ms``? Cut before it does: engines
        reject audio even one window longer than their 30 s input."""
        return self._clock_ms - self._audio_start_ms + WINDOW_MS > self.options.max_utterance_ms

    def _has_audio(self) -> bool:
        return bool(self._audio)

    def _reset_region(self) -> None:
        self._active = False
        self._confirmed = False
        self._index = -1
        self._audio = []
        self._audio_start_ms = 0
        self._onset_ms = 0
        self._last_speech_end_ms = 0
        self._silence_run_ms = 0
        self._peeked_pause = False

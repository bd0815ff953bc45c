"""Cut a call's audio into utterances from per-window speech probabilities.

Synchronous, no I/O, no clock: time is the count of 32 ms windows pushed, so a scripted list
of probabilities drives it exactly (tests do). Where speech starts and ends is the turn rule
of ``agent/turns.py`` (the one file transcription uses too); this module adds what a live call
needs around it: the audio, pre-roll (``prefix_padding_ms``) kept in front of the onset,
utterance numbering, and a forced cut at the maximum utterance length. With turn detection
off, audio accumulates until the client commits.

Inside confirmed speech, the first silent window emits ``SpeechPaused`` so the final decode
can start before the hangover ends. ``peek`` lets that pause come sooner, from a look at the
audio that arrived since the last whole window; times and cuts stay on the window grid.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.config import SegmenterConfig, VadConfig
from agent.turns import (
    Dropped,
    Ended,
    Paused,
    Resumed,
    Started,
    TurnDetector,
    TurnOptions,
)
from agent.vad import WINDOW_MS, WINDOW_SAMPLES

Cut = Literal["silence", "max_length", "commit", "end_of_call"]


@dataclass(frozen=True)
class SegmenterOptions:
    """A call's segmentation; ``turn_detection=False`` means client-driven commits."""

    turns: TurnOptions = field(default_factory=TurnOptions)
    prefix_padding_ms: int = 300
    max_utterance_ms: int = 30_000
    turn_detection: bool = True

    @classmethod
    def from_config(cls, vad: VadConfig, segmenter: SegmenterConfig) -> SegmenterOptions:
        return cls(
            turns=TurnOptions.from_config(vad, segmenter),
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
        turns = self.turns
        turns = TurnOptions(
            threshold=turns.threshold if threshold is None else threshold,
            min_speech_ms=turns.min_speech_ms,
            min_silence_ms=turns.min_silence_ms if silence_ms is None else silence_ms,
        )
        padding = self.prefix_padding_ms if prefix_padding_ms is None else prefix_padding_ms
        return replace(self, turns=turns, prefix_padding_ms=padding, turn_detection=True)


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
    final decode that is used if the hangover completes and dropped if speech resumes.
    ``audio`` is as long as the cut will be: the hangover not heard yet is digital silence."""

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
    # The open utterance, (re)set by _reset_region. Where its speech starts and ends is the
    # turn detector's under server VAD; without it the whole audio is speech.
    _index: int
    _audio: list[npt.NDArray[np.float32]]
    _audio_start_ms: int

    def __init__(self, options: SegmenterOptions) -> None:
        self.options = options
        self._clock_ms = 0
        self._next_index = 0
        self._turns = TurnDetector(options.turns)
        self._ring: deque[npt.NDArray[np.float32]] = deque(maxlen=self._pre_roll_windows())
        self._reset_region()

    @property
    def clock_ms(self) -> int:
        return self._clock_ms

    @property
    def in_speech(self) -> bool:
        """True between ``speech_started`` and ``speech_stopped``."""
        return self._turns.confirmed

    @property
    def open_index(self) -> int:
        """Index of the confirmed open utterance, or -1."""
        return self._index if self._turns.confirmed else -1

    @property
    def paused(self) -> bool:
        """Inside confirmed speech, but in a silence that may become its end."""
        return self._turns.paused

    @property
    def can_pause(self) -> bool:
        """Confirmed speech under server VAD, not paused yet: what a ``peek`` may pause."""
        return self.options.turn_detection and self._turns.confirmed and not self.paused

    def open_audio(self) -> npt.NDArray[np.float32]:
        """The open utterance's audio so far (pre-roll included), for interim decodes."""
        return np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)

    def update(self, options: SegmenterOptions) -> list[SegmenterEvent]:
        """Apply new settings (``session.update``); an open utterance is kept."""
        events: list[SegmenterEvent] = []
        if options.turn_detection != self.options.turn_detection:
            # Switching modes ends whatever the old mode had open rather than mixing rules.
            events = self._finish_open("commit") if self._audio else []
            self._reset_region()
            # Manual mode pushes no probabilities: the turn windows restart at the call's.
            self._turns = TurnDetector(options.turns, position=self._clock_ms // WINDOW_MS)
        self.options = options
        self._turns.options = options.turns
        self._ring = deque(self._ring, maxlen=self._pre_roll_windows())
        return events

    def push(self, window: npt.NDArray[np.float32], probability: float) -> list[SegmenterEvent]:
        """Feed one 32 ms window and its speech probability; returns what it completes."""
        if len(window) != WINDOW_SAMPLES:
            raise ValueError(f"expected {WINDOW_SAMPLES} samples, got {len(window)}")
        self._clock_ms += WINDOW_MS
        if not self.options.turn_detection:
            return self._push_manual(window)
        return self._push_vad(window, probability)

    def peek(self, probability: float, tail: npt.NDArray[np.float32]) -> list[SegmenterEvent]:
        """A look at ``tail``, the samples since the last whole window (``probability`` from
        ``VadStream.peek``): if confirmed speech already sounds silent there, pause now rather
        than when the window completes, up to 32 ms later. The next whole window confirms the
        pause (no second ``SpeechPaused``) or resumes speech (``SpeechResumed``)."""
        if not self.options.turn_detection or not self._turns.peek(probability):
            return []
        at_ms = self._clock_ms + len(tail) * WINDOW_MS // WINDOW_SAMPLES
        audio = self._as_cut([*self._audio, tail], silent_samples=len(tail))
        return [SpeechPaused(self._index, audio, at_ms)]

    def commit(self) -> list[SegmenterEvent]:
        """Cut now (``input_audio_buffer.commit``). Empty list when there is nothing to cut."""
        if not self._audio or (self.options.turn_detection and not self._turns.confirmed):
            return []
        return self._finish_open("commit")

    def clear(self) -> None:
        """Drop the open utterance and the pre-roll (``input_audio_buffer.clear``)."""
        self._ring.clear()
        self._reset_region()

    def flush(self) -> list[SegmenterEvent]:
        """End of the call: hand over whatever speech is open so no word is lost."""
        if not self._audio or (self.options.turn_detection and not self._turns.confirmed):
            return []
        return self._finish_open("end_of_call")

    # -- internals ---------------------------------------------------------------------

    def _push_manual(self, window: npt.NDArray[np.float32]) -> list[SegmenterEvent]:
        if not self._audio:
            self._audio_start_ms = self._clock_ms - WINDOW_MS
        self._audio.append(window)
        if self._full():
            return self._finish_open("max_length")
        return []

    def _push_vad(
        self, window: npt.NDArray[np.float32], probability: float
    ) -> list[SegmenterEvent]:
        was_open = self._turns.open
        turns = self._turns.push(probability)
        if not was_open and not turns:
            self._ring.append(window)
            return []
        if not was_open:  # this window opened a region: the pre-roll goes in front of it
            self._audio = list(self._ring)
            self._audio_start_ms = self._clock_ms - WINDOW_MS * (len(self._ring) + 1)
            self._ring.clear()
        self._audio.append(window)
        events: list[SegmenterEvent] = []
        for turn in turns:
            match turn:
                case Resumed():
                    events.append(SpeechResumed(self._index))
                case Paused():
                    audio = self._as_cut(self._audio, silent_samples=WINDOW_SAMPLES)
                    events.append(SpeechPaused(self._index, audio, self._clock_ms))
                case Started(start):
                    self._index = self._next_index
                    self._next_index += 1
                    events.append(SpeechStarted(self._index, start * WINDOW_MS))
                case Ended(start, end):
                    events.extend(self._finish("silence", start * WINDOW_MS, end * WINDOW_MS))
                case Dropped():
                    # A blip shorter than min_speech_ms: never announced, its audio becomes
                    # pre-roll for whatever comes next.
                    self._ring.extend(self._audio)
                    self._reset_region()
        if self._turns.confirmed and self._full():
            events.extend(self._finish_open("max_length"))
        return events

    def _finish_open(self, cut: Cut) -> list[SegmenterEvent]:
        """Cut the open utterance now: its speech so far (all its audio without server VAD)."""
        if not self.options.turn_detection:
            return self._finish(cut, self._audio_start_ms, self._clock_ms)
        end = self._clock_ms if cut == "max_length" else self._turns.speech_end * WINDOW_MS
        return self._finish(cut, self._turns.start * WINDOW_MS, end)

    def _finish(self, cut: Cut, start_ms: int, end_ms: int) -> list[SegmenterEvent]:
        events: list[SegmenterEvent] = []
        if self._index < 0:
            self._index = self._next_index
            self._next_index += 1
        if self.options.turn_detection:
            events.append(SpeechStopped(self._index, end_ms, self._clock_ms))
        events.append(
            Utterance(
                index=self._index,
                audio=self.open_audio(),
                audio_start_ms=self._audio_start_ms,
                start_ms=start_ms,
                end_ms=end_ms,
                cut=cut,
            )
        )
        self._reset_region()
        return events

    def _as_cut(
        self, heard: list[npt.NDArray[np.float32]], silent_samples: int
    ) -> npt.NDArray[np.float32]:
        """``heard`` joined (one copy), paused after ``silent_samples`` of silence, as long
        as the cut will be if the silence lasts out the hangover: the rest of it as digital
        silence. tiny.en mishears more of speech that stops one window before the end of
        its audio: the live path's turns decoded offline (``bench/offline_wer.py
        --turns-only``, six files of read speech, 6416 words) made 597 errors on the audio
        up to the pause, 578 on it padded so, 573 on the cut itself (docs/benchmarks.md)."""
        hangover = self.options.turns.min_silence_windows * WINDOW_SAMPLES
        silence = np.zeros(max(hangover - silent_samples, 0), np.float32)
        return np.concatenate([*heard, silence])

    def _full(self) -> bool:
        """Would one more window overflow ``max_utterance_ms``? Cut before it does: engines
        reject audio even one window longer than their 30 s input."""
        return self._clock_ms - self._audio_start_ms + WINDOW_MS > self.options.max_utterance_ms

    def _pre_roll_windows(self) -> int:
        return -(-self.options.prefix_padding_ms // WINDOW_MS)

    def _reset_region(self) -> None:
        self._turns.reset()
        self._index = -1
        self._audio = []
        self._audio_start_ms = 0

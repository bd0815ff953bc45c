"""The turn rule: where speech starts and ends, from one speech probability per VAD window.

One pure state machine used by the live segmenter (``agent/segmenter.py``, a call's
utterances) and the file planner (``agent/chunking.py``, a recording's speech regions), so
the two cut the same audio the same way. Synchronous, no I/O, no audio: time is the index of
the window pushed. The rule is OpenAI ``server_vad``'s as Silero implements it:

- hysteresis: a region opens at a window at ``threshold`` and continues while windows stay
  at ``neg_threshold`` (``threshold - 0.15``) or above;
- minimum speech: a region is announced (``Started``) once its speech spans
  ``min_speech_ms``; a shorter one is ``Dropped`` when it ends (a click, a breath);
- hangover: a region ends after ``min_silence_ms`` of windows under ``neg_threshold``; its
  end is the end of its last speech window.

What each side adds stays with it: pre-roll, pauses for speculative decodes and the forced
cut at the engines' 30 s limit live; splitting at pauses and packing for files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import SegmenterConfig, VadConfig
from agent.vad import WINDOW_MS

NEG_THRESHOLD_GAP = 0.15  # Silero's own hysteresis: speech ends below threshold - 0.15


def ms_to_windows(ms: int) -> int:
    """Whole windows needed to cover ``ms`` (a duration reached at the window grid)."""
    return -(-ms // WINDOW_MS)


@dataclass(frozen=True)
class TurnOptions:
    """The turn rule's settings, shared by calls and files (``vad`` and ``segmenter``
    configuration); the derived thresholds are computed here once."""

    threshold: float = 0.5
    min_speech_ms: int = 100
    min_silence_ms: int = 200
    #: Speech continues down to this probability.
    neg_threshold: float = field(init=False)
    #: The rule on the window grid: spans of at least these many windows.
    min_speech_windows: int = field(init=False)
    min_silence_windows: int = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.min_speech_ms < 0 or self.min_silence_ms < 0:
            raise ValueError("min_speech_ms and min_silence_ms must be >= 0")
        object.__setattr__(self, "neg_threshold", max(self.threshold - NEG_THRESHOLD_GAP, 0.01))
        object.__setattr__(self, "min_speech_windows", ms_to_windows(self.min_speech_ms))
        # A hangover of no window would end speech on its own speech window.
        object.__setattr__(self, "min_silence_windows", max(ms_to_windows(self.min_silence_ms), 1))

    @classmethod
    def from_config(cls, vad: VadConfig, segmenter: SegmenterConfig) -> TurnOptions:
        return cls(
            threshold=vad.threshold,
            min_speech_ms=segmenter.min_speech_ms,
            min_silence_ms=segmenter.min_silence_ms,
        )

    def is_speech(self, probability: float) -> bool:
        """Does this window continue an open region?"""
        return probability >= self.neg_threshold


@dataclass(frozen=True)
class Opened:
    """A window at ``threshold`` opened a region that is not yet speech."""

    start: int


@dataclass(frozen=True)
class Started:
    """The open region now spans ``min_speech_ms``: it is speech, from window ``start``."""

    start: int


@dataclass(frozen=True)
class Paused:
    """The first window under ``neg_threshold`` inside announced speech (the hangover runs)."""

    at: int


@dataclass(frozen=True)
class Resumed:
    """Announced speech came back before the hangover ended."""


@dataclass(frozen=True)
class Ended:
    """Announced speech ended: windows ``start`` (inclusive) to ``end`` (exclusive)."""

    start: int
    end: int


@dataclass(frozen=True)
class Dropped:
    """A region that ended shorter than ``min_speech_ms``: never announced."""

    start: int
    end: int


TurnEvent = Opened | Started | Paused | Resumed | Ended | Dropped


class TurnDetector:
    """One stream's turn state. ``push`` one probability per window, in order."""

    def __init__(self, options: TurnOptions, position: int = 0) -> None:
        self.options = options
        #: Windows pushed so far (the stream may start at a later window than 0).
        self.position = position
        self._open = False
        self._start = 0
        self._speech_end = 0  # exclusive: the window after the last speech window
        self._confirmed = False
        self._peeked = False  # a look between windows heard the silence first

    @property
    def open(self) -> bool:
        """A region is open, announced or not."""
        return self._open

    @property
    def confirmed(self) -> bool:
        """Inside announced speech (between ``Started`` and ``Ended``)."""
        return self._confirmed

    @property
    def start(self) -> int:
        """First window of the open region."""
        return self._start

    @property
    def speech_end(self) -> int:
        """End (exclusive) of the open region's last speech window."""
        return self._speech_end

    @property
    def silent_windows(self) -> int:
        """Windows under ``neg_threshold`` since the open region's last speech window."""
        return self.position - self._speech_end if self._open else 0

    @property
    def paused(self) -> bool:
        """Inside announced speech, in a silence that may become its end."""
        return self._confirmed and (self.silent_windows > 0 or self._peeked)

    def peek(self, probability: float) -> bool:
        """A look at audio between whole windows: if announced speech already sounds silent
        there, pause now (True); the next window confirms the pause or resumes."""
        if not self._confirmed or self.paused or self.options.is_speech(probability):
            return False
        self._peeked = True
        return True

    def push(self, probability: float) -> list[TurnEvent]:
        """One window's probability; returns what it changes, in order."""
        opts = self.options
        was_paused = self.paused
        i = self.position
        self.position += 1
        events: list[TurnEvent] = []
        if not self._open:
            if probability < opts.threshold:
                return events
            # The opening window is speech even where neg_threshold's floor (0.01) lies
            # above the threshold.
            self._open, self._start, self._speech_end = True, i, i + 1
            events.append(Opened(i))
        elif opts.is_speech(probability):
            if was_paused:
                events.append(Resumed())
            self._speech_end = i + 1
            self._peeked = False
        elif (
            self._confirmed
            and self.silent_windows == 1 < opts.min_silence_windows
            and not self._peeked
        ):
            events.append(Paused(i))
        if not self._confirmed and self._speech_end - self._start >= opts.min_speech_windows:
            self._confirmed = True
            events.append(Started(self._start))
        if self.silent_windows >= opts.min_silence_windows:
            events.append(self._close())
        return events

    def finish(self) -> list[TurnEvent]:
        """End of the stream: close the open region as it stands."""
        return [self._close()] if self._open else []

    def reset(self) -> None:
        """Forget the open region (a cut the caller made: commit, clear, maximum length)."""
        self._open = False
        self._confirmed = False
        self._peeked = False

    def _close(self) -> Ended | Dropped:
        region = (Ended if self._confirmed else Dropped)(self._start, self._speech_end)
        self.reset()
        return region

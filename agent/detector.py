"""Speech detection for one call: chunks of samples -> 32 ms windows -> VAD -> segmenter.

With ``speculative`` on, every pause starts a speculative final decode, and with ``peek``
too the detector listens for pauses between windows: each chunk that leaves a partial window
gets a VAD look (``VadStream.peek``) at the newest 32 ms while speech is open, and the
segmenter pauses as soon as the silence is heard rather than when the next whole window
completes (one more VAD step per chunk, only during speech). A pause's decode is also a
hypothesis of the audio so far, so it counts as the interim: the next ``InterimDue`` comes
an interval after it. An utterance's first ``InterimDue`` comes half an interval after its
onset (the agreement needs two hypotheses before the first delta).

Synchronous and I/O-free like the parts it joins; the session runs it on a worker thread so
the ONNX model never runs on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.segmenter import (
    Segmenter,
    SegmenterEvent,
    SegmenterOptions,
    SpeechPaused,
    SpeechStarted,
)
from agent.vad import PEEK_SAMPLES, WINDOW_SAMPLES, VadStream


@dataclass(frozen=True, eq=False)
class InterimDue:
    """Time to re-transcribe the open utterance: its audio so far."""

    index: int
    audio: npt.NDArray[np.float32]


DetectorEvent = SegmenterEvent | InterimDue


class SpeechDetector:
    def __init__(
        self,
        vad: VadStream,
        options: SegmenterOptions,
        interim_interval_ms: int = 0,
        speculative: bool = False,
        peek: bool = True,
    ) -> None:
        self.vad = vad
        self.segmenter = Segmenter(options)
        #: 0 turns interims off.
        self.interim_interval_ms = interim_interval_ms
        #: Pauses start speculative decodes (and count as that interval's interim)...
        self.speculative = speculative
        #: ...and are looked for between windows too.
        self.peek = speculative and peek
        self._pending = np.zeros(0, dtype=np.float32)
        self._recent = np.zeros(PEEK_SAMPLES, dtype=np.float32)  # newest samples, for looks
        self._last_interim_ms = 0

    def process(self, samples: npt.NDArray[np.float32]) -> list[DetectorEvent]:
        """Add samples of any length; returns the events of every window they complete."""
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n_windows = len(buf) // WINDOW_SAMPLES
        events: list[DetectorEvent] = []
        for i in range(n_windows):
            window = buf[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
            found = self.segmenter.push(window, self.vad.probability(window))
            events.extend(found)
            events.extend(self._interim(found))
        self._pending = buf[n_windows * WINDOW_SAMPLES :].copy()
        self._recent = np.concatenate([self._recent, samples])[-PEEK_SAMPLES:]
        seg = self.segmenter
        if self.peek and len(self._pending) and seg.can_pause:
            found = seg.peek(self.vad.peek(self._recent), self._pending)
            events.extend(found)
            self._restart_interval(found)
        return events

    def _restart_interval(self, found: list[SegmenterEvent]) -> None:
        """Interims count from speech onset, and from a speculative pause: its decode
        doubles as that interval's interim. The first interim of an utterance is due half
        an interval after its onset: the first delta needs two hypotheses that agree, so it
        comes half an interval sooner, at no extra decode (docs/benchmarks.md, read60's
        first delta p95 about 0.1 s sooner)."""
        restart = (SpeechStarted, SpeechPaused) if self.speculative else (SpeechStarted,)
        for event in found:
            if isinstance(event, restart):
                onset = isinstance(event, SpeechStarted)
                head_start_ms = self.interim_interval_ms // 2 if onset else 0
                self._last_interim_ms = self.segmenter.clock_ms - head_start_ms

    def _interim(self, found: list[SegmenterEvent]) -> list[DetectorEvent]:
        seg = self.segmenter
        self._restart_interval(found)
        if (
            not self.interim_interval_ms
            or not seg.in_speech
            or seg.paused  # a speculative final is already decoding this audio
            or seg.clock_ms - self._last_interim_ms < self.interim_interval_ms
        ):
            return []
        self._last_interim_ms = seg.clock_ms
        return [InterimDue(seg.open_index, seg.open_audio())]

    def flush(self) -> list[DetectorEvent]:
        """End of audio: pad the last partial window with silence, then close any speech."""
        events: list[DetectorEvent] = []
        if len(self._pending):
            tail = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
            tail[: len(self._pending)] = self._pending
            self._pending = np.zeros(0, dtype=np.float32)
            events.extend(self.segmenter.push(tail, self.vad.probability(tail)))
        events.extend(self.segmenter.flush())
        return events

    def clear(self) -> None:
        # The partial window stays: dropping it would shift the call's audio clock.
        self.segmenter.clear()
        self.vad.reset()

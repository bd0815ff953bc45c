"""Speech detection for one call: chunks of samples -> 32 ms windows -> VAD -> segmenter.

Synchronous and I/O-free like the parts it joins; the session runs it on a worker thread so
the ONNX model never runs on the event loop.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.segmenter import Segmenter, SegmenterEvent, SegmenterOptions
from agent.vad import WINDOW_SAMPLES, VadStream


class SpeechDetector:
    def __init__(self, vad: VadStream, options: SegmenterOptions) -> None:
        self.vad = vad
        self.segmenter = Segmenter(options)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, samples: npt.NDArray[np.float32]) -> list[SegmenterEvent]:
        """Add samples of any length; returns the events of every window they complete."""
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n_windows = len(buf) // WINDOW_SAMPLES
        events: list[SegmenterEvent] = []
        for i in range(n_windows):
            window = buf[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
            events.extend(self.segmenter.push(window, self.vad.probability(window)))
        self._pending = buf[n_windows * WINDOW_SAMPLES :].copy()
        return events

    def flush(self) -> list[SegmenterEvent]:
        """End of audio: pad the last partial window with silence, then close any speech."""
        events: list[SegmenterEvent] = []
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

"""Voice activity detection: one speech probability per 32 ms window of 16 kHz audio.

Synchronous and I/O-free. ``Silero`` runs the Silero v6 ONNX model through onnxruntime (the
file bundled with faster-whisper, so no torch and no download); ``Energy`` is an RMS gate
for machines where even that is too much. A ``VadStream`` keeps one call's recurrent state;
the ONNX session itself is shared by all calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.config import VadConfig

WINDOW_SAMPLES = 512  # 32 ms at 16 kHz: the only window size Silero accepts at this rate
WINDOW_MS = 32
_CONTEXT_SAMPLES = 64  # Silero v5/v6 expect the previous window's last 64 samples prepended
#: Samples ``VadStream.peek`` needs: one window and the context in front of it.
PEEK_SAMPLES = WINDOW_SAMPLES + _CONTEXT_SAMPLES


class VadStream(ABC):
    """One call's detector. ``probability`` takes exactly one window at a time, in order."""

    @abstractmethod
    def probability(self, window: npt.NDArray[np.float32]) -> float:
        """Speech probability in [0, 1] of one ``WINDOW_SAMPLES`` window."""

    @abstractmethod
    def peek(self, recent: npt.NDArray[np.float32]) -> float:
        """Speech probability of the newest ``WINDOW_SAMPLES`` of ``recent`` (the last
        ``PEEK_SAMPLES`` samples heard), off the window grid and without moving the stream:
        a look at audio that has arrived since the last whole window."""

    def reset(self) -> None:
        """Forget the recurrent state (after ``input_audio_buffer.clear``)."""


class Vad(ABC):
    """A detector model shared by every call; hands out per-call streams."""

    @abstractmethod
    def stream(self) -> VadStream: ...


class SileroVad(Vad):
    def __init__(self, model_path: str = "") -> None:
        import onnxruntime

        path = model_path or str(_bundled_silero())
        options = onnxruntime.SessionOptions()
        # One thread per run: windows are tiny and many calls run them concurrently.
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )

    def stream(self) -> VadStream:
        return _SileroStream(self._session)


class _SileroStream(VadStream):
    def __init__(self, session: object) -> None:
        self._session = session
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)

    def probability(self, window: npt.NDArray[np.float32]) -> float:
        assert len(window) == WINDOW_SAMPLES
        prob, self._h, self._c = self._run(np.concatenate([self._context, window]))
        self._context = window[-_CONTEXT_SAMPLES:].copy()
        return prob

    def peek(self, recent: npt.NDArray[np.float32]) -> float:
        # The recurrent state is the one after the last whole window, which overlaps this
        # one. Silero's state moves slowly, so the look is good enough to start a speculative
        # decode early; the next whole window, run on the true state, confirms or withdraws it.
        assert len(recent) >= PEEK_SAMPLES
        prob, _, _ = self._run(recent[-PEEK_SAMPLES:])
        return prob

    def _run(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[float, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One model step on context + window from the current state: (probability, h, c)."""
        feed = {"input": np.ascontiguousarray(x, np.float32)[None, :], "h": self._h, "c": self._c}
        prob, h, c = self._session.run(None, feed)  # type: ignore[attr-defined]
        return float(np.asarray(prob).reshape(-1)[0]), h, c


class EnergyVad(Vad):
    """RMS gate mapped to a pseudo-probability: 1.0 above the threshold, 0.0 below."""

    def __init__(self, threshold: float) -> None:
        self._threshold = threshold

    def stream(self) -> VadStream:
        return _EnergyStream(self._threshold)


class _EnergyStream(VadStream):
    def __init__(self, threshold: float) -> None:
        self._threshold = threshold

    def probability(self, window: npt.NDArray[np.float32]) -> float:
        rms = float(np.sqrt(np.mean(np.square(window, dtype=np.float64))))
        return 1.0 if rms >= self._threshold else 0.0

    def peek(self, recent: npt.NDArray[np.float32]) -> float:
        return self.probability(recent[-WINDOW_SAMPLES:])  # stateless: a look is a window


def create_vad(config: VadConfig) -> Vad:
    if config.kind == "energy":
        return EnergyVad(config.energy_threshold)
    return SileroVad(config.model_path)


def _bundled_silero() -> Path:
    import faster_whisper

    return Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"

"""What a call reports for metrics, without knowing any metrics library.

``CallObserver`` is the seam between a call and whatever counts: the server passes one that
feeds Prometheus (``signaling.metrics``); the default does nothing, so ``agent/`` stays free of
HTTP and monitoring concerns and tests need no fake.
"""

from __future__ import annotations


class CallObserver:
    """No-op hooks; override the ones you count. Called on the event loop, must not block."""

    def call_ended(self, reason: str) -> None:
        """A call ended, for ``reason`` (``idle_timeout``, ``max_duration``, ...)."""

    def utterance_committed(self) -> None:
        """An utterance went to the engine as a final."""

    def final_completed(self, end_of_speech_to_final_s: float) -> None:
        """A ``completed`` event left, this long after the end of speech (VAD hangover +
        end-of-speech decision to the event leaving the server)."""

    def transcription_failed(self, code: str) -> None:
        """A final failed with this error code (``engine_error``, ``engine_timeout``, ...)."""

    def protocol_error(self, code: str) -> None:
        """A client message on the data channel was refused with this code."""

    def event_dropped(self, reason: str) -> None:
        """An event was not sent: ``backpressure`` (send buffer full) or ``outbox_full``."""

    def audio_lag(self, seconds: float) -> None:
        """How far behind real time a chunk of the call's audio was when the VAD had it."""


class AudioLagMeter:
    """How far behind real time a call's audio is once processed, per chunk.

    The reference is the earliest moment the audio could have been complete: over all chunks
    so far, the minimum of (receive time - audio seconds up to its end). Lag = processing time
    - reference - audio seconds: the network's fixed delay cancels out; a stalled event loop,
    an overloaded VAD pool or a jitter-buffer burst shows. A receive gap longer than
    ``gap_s`` (a muted or DTX peer sends nothing) starts a new reference.
    """

    def __init__(self, sample_rate: int = 16_000, gap_s: float = 2.0) -> None:
        self._rate = sample_rate
        self._gap_s = gap_s
        self._reference: float | None = None
        self._last_received = 0.0
        self._audio_s = 0.0

    def lag(self, received_at: float, samples: int, processed_at: float) -> float:
        if received_at - self._last_received > self._gap_s:
            self._reference = None
        self._last_received = received_at
        self._audio_s += samples / self._rate
        start = received_at - self._audio_s
        self._reference = start if self._reference is None else min(self._reference, start)
        return processed_at - self._reference - self._audio_s

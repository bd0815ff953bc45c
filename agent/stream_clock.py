"""Audio time from a sender's timestamps: gaps become silence, repeats and late chunks go.

Twilio stamps each ``media`` chunk with the milliseconds since the stream started. Audio
time must follow that stamp, not the order or pace in which chunks arrive: a chunk lost on
Twilio's side leaves a gap that must still count as time (else every later
``audio_start_ms`` is early, and an utterance cut by the loss never hears its silence); a
chunk sent twice, or one that arrives after later audio was placed, would otherwise be heard
twice or out of order.

``TrackClock.place`` takes a chunk's stamp and its encoded bytes and answers the bytes to
decode: the chunk as it is, preceded by silence when there was a gap, or ``None`` when it is
a repeat or late. Gaps are measured against the end of the audio placed so far, with
``TOLERANCE_MS`` of slack either way (stamps are whole milliseconds, chunks rarely exactly
20 ms). The silence filled per gap is capped: a stamp hours ahead (a bug, or a hostile
sender) must not cost hours of memory and VAD time; past the cap the audio time runs behind
the stamps by the excess.

Synchronous and I/O-free, one per track.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Differences smaller than this between a stamp and the expected time are jitter.
TOLERANCE_MS = 10
#: Longest silence filled for one gap; enough to end any utterance (the segmenter's
#: hangover is well under a second).
MAX_GAP_FILL_MS = 5000


@dataclass(frozen=True)
class ClockFormat:
    """The encoded audio's bytes per millisecond, and the byte that encodes silence."""

    bytes_per_ms: int
    silence: bytes


#: G.711 mu-law at 8 kHz: 8 bytes a millisecond; 0xFF is zero.
MULAW_8K = ClockFormat(bytes_per_ms=8, silence=b"\xff")


class TrackClock:
    """One track's audio time, in milliseconds of audio placed so far."""

    def __init__(self, fmt: ClockFormat = MULAW_8K, max_gap_fill_ms: int = MAX_GAP_FILL_MS) -> None:
        self._fmt = fmt
        self._max_fill_ms = max_gap_fill_ms
        #: Where the next chunk is expected, in the sender's milliseconds.
        self.expected_ms = 0.0
        self.dropped = 0
        self.filled_ms = 0

    def place(self, timestamp_ms: int, data: bytes) -> bytes | None:
        """The bytes to decode for a chunk stamped ``timestamp_ms``, or ``None`` to drop it."""
        gap_ms = timestamp_ms - self.expected_ms
        if gap_ms <= -TOLERANCE_MS:
            self.dropped += 1  # a repeat, or older than audio already placed
            return None
        fill_ms = min(round(gap_ms), self._max_fill_ms) if gap_ms >= TOLERANCE_MS else 0
        self.filled_ms += fill_ms
        duration_ms = len(data) / self._fmt.bytes_per_ms
        # Jitter within the tolerance is absorbed: time runs from the stamp when there was
        # a gap, else on from where the audio ended.
        start_ms = timestamp_ms if gap_ms >= TOLERANCE_MS else self.expected_ms
        self.expected_ms = start_ms + duration_ms
        if not fill_ms:
            return data
        return self._fmt.silence * (fill_ms * self._fmt.bytes_per_ms) + data

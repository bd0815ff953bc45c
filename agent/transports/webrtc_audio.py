"""Audio input: an aiortc audio track in, 16 kHz mono float32 chunks out.

aiortc hands over decoded Opus as s16 stereo 48 kHz frames of 960 samples; PyAV's resampler
converts them (``agent.audio_formats.resampler``). The stream ends on end of track, on a
closed peer, or when no frame arrives for ``idle_timeout_s`` (a peer that vanished without
closing sends nothing and no signal until ICE consent fails ~35 s later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent import audio_formats

SAMPLE_RATE = 16_000

EndReason = Literal["end_of_track", "idle_timeout", "stopped"]


@dataclass(frozen=True, eq=False)
class AudioChunk:
    samples: npt.NDArray[np.float32]
    #: ``time.perf_counter()`` when the frame carrying these samples was received.
    received_at: float


class AudioInput:
    """Iterate ``chunks()`` once; afterwards ``end_reason`` says why it stopped."""

    def __init__(self, track: MediaStreamTrack, idle_timeout_s: float) -> None:
        self._track = track
        self._idle_timeout_s = idle_timeout_s
        self.end_reason: EndReason | None = None
        self.frames = 0
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """End the stream now. Needed because a track whose peer never connected media
        never ends on its own: aiortc only ends tracks of receivers that started."""
        self._stopped.set()

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        resampler = audio_formats.resampler(SAMPLE_RATE)
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            while True:
                recv = asyncio.ensure_future(self._track.recv())
                await asyncio.wait(
                    {recv, stop}, timeout=self._idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not recv.done():
                    recv.cancel()
                    self.end_reason = "stopped" if stop.done() else "idle_timeout"
                    break
                try:
                    frame = recv.result()
                except MediaStreamError:
                    self.end_reason = "end_of_track"
                    break
                if not isinstance(frame, av.AudioFrame):
                    continue  # an audio track only yields audio frames; this satisfies typing
                self.frames += 1
                now = time.perf_counter()
                for out in resampler.resample(frame):
                    yield AudioChunk(_mono(out), now)
        finally:
            stop.cancel()
        # The resampler holds a few ms of filter delay: flush it so the tail is not lost.
        for out in resampler.resample(None):
            yield AudioChunk(_mono(out), time.perf_counter())


def _mono(frame: av.AudioFrame) -> npt.NDArray[np.float32]:
    return frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)

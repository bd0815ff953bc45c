"""Tests that must not depend on how fast the machine is: an engine wrapper that tells
when the engine is busy, and an audio track that waits for the server to keep up.

A live test that plays audio in real time gets fewer interim decodes on a loaded box (an
interim due while the last one still runs is skipped), so a count of deltas would depend
on the day's speed. ``EngineGatedTrack`` plays in real time but, every ``gate_ms`` of
audio, waits until the server has heard all that was sent and its engine is idle: every
interim the server wants is decoded before more audio arrives, on any machine. (The
server's ``audio.idle_timeout_s`` must then be longer than a gate may last.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import av
import numpy as np
import numpy.typing as npt

from agent.engines.base import Engine, EngineRequest, EngineResult
from voxtral_rtc_client import ArrayAudioTrack

#: Longest wait at one gate: a server that never catches up fails the test, not hangs it.
GATE_TIMEOUT_S = 60.0
#: The server is settled when it has heard the audio sent up to this much before.
HEARD_SLACK_MS = 120


class CountingEngine(Engine):
    """A real engine, counting the utterances it was handed and those it is running."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_lanes = inner.max_lanes
        self.max_batch = inner.max_batch
        self.count = 0
        self.in_flight = 0
        self._lock = threading.Lock()

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        with self._lock:
            self.count += len(batch)
            self.in_flight += 1
        try:
            return self.inner.transcribe(batch)
        finally:
            with self._lock:
                self.in_flight -= 1

    def warmup(self) -> None:
        self.inner.warmup()


class EngineGatedTrack(ArrayAudioTrack):
    """``ArrayAudioTrack`` that lets the server catch up every ``gate_ms`` of audio.

    ``settled(sent_ms)`` says whether the server has heard ``sent_ms`` of audio and has no
    decode queued or running. Waiting shifts the playback clock, so no burst follows.
    """

    def __init__(
        self,
        samples: npt.NDArray[np.float32],
        settled: Callable[[float], bool],
        gate_ms: int = 250,
    ) -> None:
        super().__init__(samples, then_silence=True)
        self._settled = settled
        self._gate = 16 * gate_ms
        self._next_gate = self._gate
        self.gates = 0

    async def recv(self) -> av.AudioFrame:
        pos = self._pos
        if self.started_at is not None and pos >= self._next_gate and not self.finished:
            self._next_gate += self._gate
            loop = asyncio.get_running_loop()
            began = loop.time()
            sent_ms = pos / 16
            # Twice in a row, a poll apart: a decode due is queued a loop turn after the
            # audio that made it due was heard.
            calm = 0
            while calm < 2:
                calm = calm + 1 if self._settled(sent_ms) else 0
                if loop.time() - began > GATE_TIMEOUT_S:
                    raise TimeoutError(f"the server did not catch up at {sent_ms:.0f} ms")
                await asyncio.sleep(0.02)
            self.started_at += loop.time() - began
            self.gates += 1
        return await super().recv()


def server_settled(server: object, engine: CountingEngine) -> Callable[[float], bool]:
    """``settled`` for the one call of an in-process server."""
    from signaling.app import RunningServer

    assert isinstance(server, RunningServer)

    def settled(sent_ms: float) -> bool:
        worker = server.state.worker
        calls = list(server.state.calls.values())
        if worker is None or len(calls) != 1:
            return False
        heard = calls[0].heard_ms
        return (
            heard >= sent_ms - HEARD_SLACK_MS and worker.queue_depth == 0 and not engine.in_flight
        )

    return settled

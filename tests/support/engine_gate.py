"""Tests that must not depend on how fast the machine is: an engine wrapper that tells
when the engine is busy, an audio track that waits for the server to keep up, and a fake
engine whose calls wait at gates the test opens.

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
from collections.abc import Callable, Iterable, Sequence

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


def tag(request: EngineRequest) -> int:
    """A request's key: its first sample (tests write a number there)."""
    return int(request.audio[0])


def length_ms(request: EngineRequest) -> int:
    """A request's key: its audio length in ms."""
    return len(request.audio) // 16


class GatedEngine(Engine):
    """Answers ``answer(key)`` for each request of a call: at once, or, for the keys in
    ``gated``, only once the test opens their gate. Tells the test on its event loop which
    keys the engine has begun, so a test steps through an engine's states instead of
    sleeping while they happen. Built inside the test's event loop."""

    name = "gated"

    def __init__(
        self,
        answer: Callable[[int], str],
        key: Callable[[EngineRequest], int] = tag,
        gated: Iterable[int] = (),
        lanes: int = 1,
    ) -> None:
        self.answer = answer
        self.key = key
        self.max_lanes = lanes
        self.batches: list[list[int]] = []
        self._gates = {k: threading.Event() for k in gated}
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._done: list[int] = []

    @property
    def begun(self) -> list[int]:
        """Keys the engine has begun, in order."""
        with self._lock:
            return [k for batch in self.batches for k in batch]

    @property
    def finished(self) -> list[int]:
        """Keys the engine has answered (or failed), in order."""
        with self._lock:
            return list(self._done)

    def warmup(self) -> None:
        pass

    def open(self, *keys: int) -> None:
        for k in keys:
            self._gates[k].set()

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        keys = [self.key(r) for r in batch]
        with self._lock:
            self.batches.append(keys)
        self._loop.call_soon_threadsafe(self._changed.set)
        try:
            for k in keys:
                gate = self._gates.get(k)
                if gate is not None and not gate.wait(GATE_TIMEOUT_S):
                    raise TimeoutError(f"the test never opened the gate of {k}")
            return [EngineResult(self.answer(k)) for k in keys]
        finally:
            with self._lock:
                self._done.extend(keys)
            self._loop.call_soon_threadsafe(self._changed.set)

    async def reached(self, key: int, done: bool = False) -> None:
        """Until the engine has begun (``done``: answered) ``key``."""
        seen = (lambda: key in self.finished) if done else (lambda: key in self.begun)
        while not seen():
            self._changed.clear()
            if seen():
                break
            await asyncio.wait_for(self._changed.wait(), GATE_TIMEOUT_S)

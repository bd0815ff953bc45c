"""A clock that moves only when a test moves it (``agent.clock.Clock``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: Longest a test waits, in real time, for something the machine does (an engine thread
#: reaching a gate, a task finishing): a bound on a hang, never a step of the test.
REAL_TIMEOUT_S = 30.0


class ManualClock:
    def __init__(self) -> None:
        self._now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self._now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    @property
    def sleeping(self) -> int:
        """Sleeps not over yet."""
        return len(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Let the tasks that are ready run (a task spawned just now starts its sleep at
        the present time), then move time on, wake every sleep that is over and let the
        woken tasks run."""
        await _loop_turns()
        self._now += seconds
        for deadline, future in list(self._sleepers):
            if deadline <= self._now and not future.done():
                future.set_result(None)
        await _loop_turns()


async def _loop_turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], what: str = "the condition") -> None:
    """Let the loop and the engine threads run until ``condition`` holds."""
    deadline = time.monotonic() + REAL_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {REAL_TIMEOUT_S} s")
        await asyncio.sleep(0.001)

"""The time that scheduling reads: ``now`` and ``sleep``, injected where timing is decided.

The engine worker (batch waits, stale interims, the watchdog, lag) and the item pipeline
(holds, lag notices, server time) take a ``Clock``; the real one is the default. Tests pass a
clock they move by hand, so what they check does not depend on how busy the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock."""

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock."""


class SystemClock:
    """The machine's monotonic clock and the event loop's sleep."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


async def finished_within(clock: Clock, future: asyncio.Future[T], seconds: float) -> bool:
    """Wait up to ``seconds`` of ``clock`` for ``future``; whether it is done (it is never
    cancelled here)."""
    if future.done():
        return True
    timer = asyncio.ensure_future(clock.sleep(seconds))
    either: set[asyncio.Future[Any]] = {future, timer}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
    return future.done()


async def wait_for(clock: Clock, awaitable: Awaitable[T], seconds: float) -> T:
    """``asyncio.wait_for`` on ``clock``: the awaitable's result, or ``TimeoutError`` once
    ``seconds`` have passed (the awaitable is then cancelled)."""
    future = asyncio.ensure_future(awaitable)
    try:
        if await finished_within(clock, future, seconds):
            return future.result()
    except asyncio.CancelledError:
        future.cancel()
        raise
    future.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await future
    raise TimeoutError

"""POST each ``completed`` of a phone call to ``telephony.webhook_url``, never blocking a call.

The URL comes from the configuration only, never from a stream or a request (a stream's
parameters naming where the server should POST would make it anyone's request forwarder).
Events wait in a bounded queue (``telephony.webhook_queue``: past it the oldest is dropped
and counted) and one task sends them in order. A POST that fails with a connection error, a
timeout, a 5xx or a 429 is tried again ``telephony.webhook_retries`` times, waiting
``RETRY_BASE_S`` and doubling; any other answer (a 4xx: the receiver refuses it) is final.
``enqueue`` never awaits: a slow or dead receiver costs the call nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Literal

import aiohttp

from agent.config import TelephonyConfig

log = logging.getLogger(__name__)

#: One POST's whole deadline.
POST_TIMEOUT_S = 5.0
#: First wait before a retry; doubled for each further one.
RETRY_BASE_S = 0.5
#: At shutdown, how long events still queued get to go out.
CLOSE_GRACE_S = 3.0

#: ``delivered``, ``failed`` (given up on) or ``dropped`` (queue full).
Outcome = Literal["delivered", "failed", "dropped"]


class WebhookSender:
    """The server's one webhook queue and the task that empties it."""

    def __init__(
        self, config: TelephonyConfig, on_outcome: Callable[[Outcome], None] | None = None
    ) -> None:
        self.url = config.webhook_url
        self._retries = config.webhook_retries
        self._queue: deque[str] = deque(maxlen=config.webhook_queue)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_outcome = on_outcome or (lambda _outcome: None)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def enqueue(self, body: str) -> None:
        """Queue one event's JSON for the webhook (the oldest goes when the queue is full)."""
        if self._closing:
            return
        if len(self._queue) == self._queue.maxlen:
            self._on_outcome("dropped")
            log.warning("webhook queue full: dropping the oldest event")
        self._queue.append(body)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="webhook-sender")

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Give what is queued ``grace_s`` to go out, then stop the task."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue:
            log.warning("webhook: %d event(s) not delivered at shutdown", len(self._queue))

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    body = self._queue[0]
                    self._on_outcome(await self._deliver(http, body))
                    if self._queue and self._queue[0] is body:
                        self._queue.popleft()  # (unless it was dropped meanwhile)
                self._idle.set()

    async def _deliver(self, http: aiohttp.ClientSession, body: str) -> Outcome:
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(RETRY_BASE_S * 2 ** (attempt - 1))
            status = await self._post(http, body)
            if status is not None and status < 300:
                return "delivered"
            if status is not None and status < 500 and status != 429:
                log.warning("webhook refused an event (HTTP %d): not retried", status)
                return "failed"
        log.warning("webhook: giving up on an event after %d tries", self._retries + 1)
        return "failed"

    async def _post(self, http: aiohttp.ClientSession, body: str) -> int | None:
        """The answer's status, or ``None`` when there was none (connection, timeout)."""
        headers = {"Content-Type": "application/json"}
        try:
            async with http.post(self.url, data=body.encode(), headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("webhook POST failed: %r", exc)
            return None

"""Where a session's events go, and the one bound on what a client leaves unread.

A transport gives its session an ``EventSink`` (the WebRTC data channel, the WebSocket). The
sink holds the policy every transport shares: while the client reads, everything is sent;
once more than ``limit`` bytes wait unsent (a client that does not read), droppable events
(deltas, interims, lag notices, errors) are dropped and the rest still go until they alone
add ``HARD_FACTOR - 1`` times the limit: then ``send`` answers ``overflow`` and the session
ends. No client can make the server hold memory without bound.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

#: A client that does not read may have events that are never dropped fill its sink up to
#: this many times the limit; then the session ends (``client_not_reading``).
HARD_FACTOR = 4

#: ``sent``; ``dropped`` (droppable, and the client is behind); ``closed`` (nobody to send
#: to any more); ``overflow`` (not sent: the client is so far behind the session must end).
Outcome = Literal["sent", "dropped", "closed", "overflow"]


class EventSink(ABC):
    """One transport's way out for events: ``send`` never blocks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes sent since the buffer last was under the limit. Counted from what is added
        #: rather than read back: the memory held is bounded whatever the transport reports.
        self._unread = 0

    def send(self, text: str, droppable: bool, type_: str = "") -> Outcome:
        """Hand on one event's JSON ``text`` (of type ``type_``), or say why not."""
        if not self.is_open():
            return "closed"
        if self.buffered_amount() <= self.limit:
            self._unread = 0  # the client reads (again)
        elif droppable:
            return "dropped"
        else:
            self._unread += len(text.encode())
            if self._unread > (HARD_FACTOR - 1) * self.limit:
                return "overflow"
        self._write_event(text, type_)
        return "sent"

    def _write_event(self, text: str, type_: str) -> None:
        """``_write``, for a sink that also needs the event's type (one that routes events
        by it, as a phone call's hub does) without parsing the JSON again."""
        self._write(text)

    @abstractmethod
    def is_open(self) -> bool:
        """Whether events can still reach the client."""

    @abstractmethod
    def buffered_amount(self) -> int:
        """Bytes handed over but not yet sent to the client."""

    @abstractmethod
    def _write(self, text: str) -> None:
        """Hand one event's JSON text to the transport, without blocking."""

    @abstractmethod
    async def flush(self, timeout_s: float) -> None:
        """Wait, up to ``timeout_s``, for what is buffered to leave."""

    async def close(self) -> None:
        """Release what the sink holds (a writer task); sending is over."""

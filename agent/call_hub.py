"""One phone call's events, fanned out: to every subscriber, and each ``completed`` onwards.

A Twilio stream's events do not go back to Twilio (it would not read them): they go to
whoever listens for the call. A call may carry several sessions (one per track of a
``both_tracks`` stream, or several streams of one call), each sending through a ``HubSink``;
the hub hands every event to each subscriber's own bounded sink (a WebSocket), so a
subscriber that does not read loses its droppable events and then its subscription, never
the call. The hub keeps the call's last ``replay_limit`` ``completed`` events and each
session's ``session.created``: a subscriber that joins late first gets those (the sessions it
will hear, with their ids and tracks, then the completed items so far), then the live events.
Each ``completed`` also goes to ``on_completed`` (the webhook queue), which must not block.

Transport-free and synchronous (``publish`` never awaits): sinks do their own writing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from agent import events
from agent.event_sink import EventSink
from agent.observer import CallObserver
from agent.session import DROPPABLE

log = logging.getLogger(__name__)

COMPLETED = f"{events.TRANSCRIPTION}.completed"
CREATED = "session.created"
#: ``session.created`` events kept for late subscribers: a call's sessions (tracks of its
#: streams) are few; past this the oldest session's is forgotten.
MAX_SESSIONS = 16


class Subscriber:
    """One listener: its sink, and how to end it (its socket then closes)."""

    def __init__(self, sink: EventSink, stop: Callable[[str], None]) -> None:
        self.sink = sink
        self.stop = stop


class CallHub:
    """The events of one call (by its SID), from its sessions to its subscribers."""

    def __init__(
        self,
        call_sid: str,
        replay_limit: int,
        max_subscribers: int,
        on_completed: Callable[[str], None] | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self.call_sid = call_sid
        self.max_subscribers = max_subscribers
        self.closed = False
        #: Streams of this call still running; the hub closes with the last one.
        self.streams = 0
        self._replay: deque[str] = deque(maxlen=replay_limit)
        self._created: deque[str] = deque(maxlen=MAX_SESSIONS)
        self._subscribers: list[Subscriber] = []
        self._on_completed = on_completed
        self._observer = observer or CallObserver()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def sink(self, limit: int) -> HubSink:
        """A sink for one of the call's sessions."""
        return HubSink(self, limit)

    def publish(self, text: str, type_: str) -> None:
        """One event (JSON text) to everyone listening; a ``completed`` is also kept."""
        if type_ == COMPLETED:
            self._replay.append(text)
            if self._on_completed is not None:
                self._on_completed(text)
        elif type_ == CREATED:
            self._created.append(text)
        for subscriber in list(self._subscribers):
            self._deliver(subscriber, text, type_)

    def subscribe(self, subscriber: Subscriber) -> bool:
        """Add a listener, the sessions and completed items so far first; ``False`` when the
        call has ended or has its ``max_subscribers``."""
        if self.closed or len(self._subscribers) >= self.max_subscribers:
            return False
        self._subscribers.append(subscriber)
        for text in list(self._created):
            self._deliver(subscriber, text, CREATED)
        for text in list(self._replay):
            self._deliver(subscriber, text, COMPLETED)
        return True

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def close(self) -> None:
        """The call is over: every subscriber is ended (after what it was sent)."""
        self.closed = True
        subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber.stop("call_ended")

    def _deliver(self, subscriber: Subscriber, text: str, type_: str) -> None:
        if subscriber not in self._subscribers:
            return  # ended while this event was being handed round
        outcome = subscriber.sink.send(text, droppable=type_ in DROPPABLE, type_=type_)
        if outcome in ("dropped", "overflow"):
            self._observer.event_dropped("backpressure")
        if outcome == "overflow":
            log.warning("call %s: a subscriber does not read its events: ending it", self.call_sid)
            self.unsubscribe(subscriber)
            subscriber.stop("client_not_reading")
        elif outcome == "closed":
            self.unsubscribe(subscriber)


class HubSink(EventSink):
    """A session's way into its call's hub. Never backs up: each subscriber's own sink
    bounds what that subscriber leaves unread, so a slow listener cannot end the call."""

    def __init__(self, hub: CallHub, limit: int) -> None:
        super().__init__(limit)
        self._hub = hub

    def is_open(self) -> bool:
        return not self._hub.closed

    def buffered_amount(self) -> int:
        return 0

    def _write(self, text: str) -> None:
        self._hub.publish(text, "")

    def _write_event(self, text: str, type_: str) -> None:
        self._hub.publish(text, type_)

    async def flush(self, timeout_s: float) -> None:
        return None  # nothing is held here

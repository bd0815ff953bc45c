"""Which transcription server gets the next request, and which ones are out of service.

Pure bookkeeping, no I/O and no clock (the remote engine does the requests and the probes):
each backend counts its requests in flight and its consecutive failures. A backend that
fails ``failure_threshold`` times in a row opens its circuit: it is skipped until a probe
succeeds (``succeeded`` closes it). Requests go to the open-circuit-free backend with the
fewest in flight; ties rotate, so an idle fleet shares the load instead of piling onto
the first server.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

#: Consecutive failures (connection errors, 5xx, timeouts) that take a backend out of
#: service. One is not enough: a keep-alive connection the server just closed fails once.
FAILURE_THRESHOLD = 3


@dataclass(eq=False)
class Backend:
    """One server; ``url`` is its base URL without the trailing slash."""

    url: str
    in_flight: int = 0
    #: Failures since its last success.
    failures: int = 0
    #: Circuit open: out of service until a probe succeeds.
    open: bool = False


class BackendPool:
    """The configured servers, in config order."""

    def __init__(self, urls: Sequence[str], failure_threshold: int = FAILURE_THRESHOLD) -> None:
        if not urls:
            raise ValueError("a backend pool needs at least one URL")
        self.backends = [Backend(url.rstrip("/")) for url in urls]
        self._threshold = max(1, failure_threshold)
        self._turn = 0

    @property
    def available(self) -> int:
        """Backends in service (circuit closed)."""
        return sum(not b.open for b in self.backends)

    @property
    def all_open(self) -> bool:
        """No backend in service: requests fail at once."""
        return self.available == 0

    def choose(self, avoid: Collection[Backend] = ()) -> Backend | None:
        """The backend in service with the fewest requests in flight, preferring those not
        in ``avoid`` (the ones a request has already failed on); ``None`` if none is in
        service."""
        closed = [b for b in self.backends if not b.open]
        if not closed:
            return None
        fresh = [b for b in closed if b not in avoid] or closed
        least = min(b.in_flight for b in fresh)
        tied = [b for b in fresh if b.in_flight == least]
        self._turn += 1
        return tied[self._turn % len(tied)]

    def succeeded(self, backend: Backend) -> bool:
        """It answered; returns True when this closed its circuit (back in service)."""
        backend.failures = 0
        reopened = backend.open
        backend.open = False
        return reopened

    def failed(self, backend: Backend) -> bool:
        """It failed; returns True when this opened its circuit (out of service)."""
        backend.failures += 1
        if backend.open or backend.failures < self._threshold:
            return False
        backend.open = True
        return True

    def take_out(self, backend: Backend) -> bool:
        """Open its circuit at once (its probe failed); True when it was in service."""
        backend.failures = max(backend.failures, self._threshold)
        was_closed = not backend.open
        backend.open = True
        return was_closed

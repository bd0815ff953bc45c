"""Which transcription server gets the next request, and which ones are out of service.

Pure bookkeeping, no I/O and no clock (the remote engine does the requests and the probes):
each backend counts its requests in flight, its answers and its consecutive failures, and
knows how many requests it runs at once (``slots``). A backend that fails
``failure_threshold`` times in a row opens its circuit: it is skipped until a probe succeeds
(``succeeded`` closes it). Requests go to the backend in service with a free slot and the
fewest in flight; ties rotate, so an idle fleet shares the load instead of piling onto the
first server.

Slots keep the queue at the gateway: a server given more requests than it runs at once only
queues them, in an order that knows nothing of finals and interims. A voxtral-rtc node says
how many it runs (``X-Voxtral-Capacity`` on its answers, its engine's lanes × batch); a
server that does not say (vLLM, which batches) gets ``max_per_backend``, which also caps
what a node says.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

#: Consecutive failures (connection errors, 5xx, failed probes) that take a backend out of
#: service. One is not enough: a keep-alive connection the server just closed fails once.
FAILURE_THRESHOLD = 3


@dataclass(eq=False)
class Backend:
    """One server; ``url`` is its base URL without the trailing slash."""

    url: str
    #: Requests at once: ``max_per_backend``, or less if the server said so.
    slots: int = 1
    in_flight: int = 0
    #: Answers it gave (any status): a request that times out while this grows was only
    #: waiting in a busy server's queue, not sent to a dead one.
    answers: int = 0
    #: Failures since its last success.
    failures: int = 0
    #: Circuit open: out of service until a probe succeeds.
    open: bool = False


class BackendPool:
    """The configured servers, in config order."""

    def __init__(
        self,
        urls: Sequence[str],
        max_per_backend: int = 16,
        failure_threshold: int = FAILURE_THRESHOLD,
    ) -> None:
        if not urls:
            raise ValueError("a backend pool needs at least one URL")
        self.max_per_backend = max(1, max_per_backend)
        self.backends = [Backend(url.rstrip("/"), self.max_per_backend) for url in urls]
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

    @property
    def capacity(self) -> int:
        """Requests the fleet runs at once: the slots of the backends in service. With none
        in service, every backend's, so that what waits is started and fails at once
        (``engine_unavailable``) instead of waiting for a slot."""
        serving = [b for b in self.backends if not b.open] or self.backends
        return sum(b.slots for b in serving)

    def advertised(self, backend: Backend, capacity: int) -> None:
        """The server said it runs ``capacity`` requests at once (capped by the config)."""
        backend.slots = max(1, min(capacity, self.max_per_backend))

    def choose(self, avoid: Collection[Backend] = ()) -> Backend | None:
        """The backend in service with a free slot and the fewest requests in flight,
        preferring those not in ``avoid`` (the ones a request has already failed on);
        ``None`` if none is in service. When every slot is taken (a retry, a server that
        just lowered its capacity) the least busy one gets it anyway: it queues there."""
        closed = [b for b in self.backends if not b.open]
        if not closed:
            return None
        fresh = [b for b in closed if b not in avoid] or closed
        free = [b for b in fresh if b.in_flight < b.slots] or fresh
        least = min(b.in_flight for b in free)
        tied = [b for b in free if b.in_flight == least]
        self._turn += 1
        return tied[self._turn % len(tied)]

    def answered(self, backend: Backend) -> None:
        """It answered something (even a refusal): it is alive."""
        backend.answers += 1

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

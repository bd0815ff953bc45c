"""The per-IP token bucket of ``POST /api/offer``, on a fake clock."""

from __future__ import annotations

import pytest

from signaling.ratelimit import TokenBucketLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_with_the_wait_until_the_next_token() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(6, clock=clock)  # 6 per minute: one token every 10 s
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == pytest.approx(10.0)
    clock.now += 4
    assert limiter.take("a") == pytest.approx(6.0)  # refusals take nothing
    clock.now += 6
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(10.0)


def test_keys_are_independent_and_refill_is_capped() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(2, clock=clock)
    assert limiter.take("a") == limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0  # another address has its own bucket
    clock.now += 3600  # an hour idle refills to the capacity, not beyond
    assert [limiter.take("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.take("a") > 0


def test_memory_is_bounded_by_forgetting_the_least_recent_key() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        assert limiter.take(key) == 0.0
    assert limiter.take("a") > 0  # "a" is now the most recent
    limiter.take("d")  # evicts "b"
    assert len(limiter) == 3
    assert limiter.take("b") == 0.0  # forgotten: a fresh bucket
    assert limiter.take("a") > 0  # still remembered


def test_zero_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucketLimiter(0)

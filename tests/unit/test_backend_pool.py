"""The remote engine's pure parts: backend choice, circuit breaker, WAV body, backoff."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from agent.audio_formats import pcm16_wav
from agent.engines.backend_pool import BackendPool
from agent.engines.remote import BACKOFF_MAX_S, backoff_s


def test_least_in_flight_wins() -> None:
    pool = BackendPool(["http://a/v1", "http://b/v1/", "http://c/v1"])
    a, b, c = pool.backends
    assert b.url == "http://b/v1"  # trailing slash dropped: paths are appended
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert pool.choose() is b
    b.in_flight = 3
    assert pool.choose() is c


def test_ties_rotate_so_an_idle_fleet_shares_the_load() -> None:
    pool = BackendPool(["http://a/v1", "http://b/v1", "http://c/v1"])
    picks = [pool.choose() for _ in range(6)]
    assert {id(b) for b in picks} == {id(b) for b in pool.backends}
    assert all(picks.count(b) == 2 for b in pool.backends)


def test_a_retry_avoids_the_backend_that_failed_unless_it_is_the_only_one() -> None:
    pool = BackendPool(["http://a/v1", "http://b/v1"])
    a, b = pool.backends
    b.in_flight = 5  # busier, but a already failed this request
    assert pool.choose(avoid=[a]) is b
    assert pool.choose(avoid=[a, b]) is a  # everything tried: the least busy again
    single = BackendPool(["http://only/v1"])
    assert single.choose(avoid=single.backends) is single.backends[0]


def test_circuit_opens_after_consecutive_failures_and_a_probe_closes_it() -> None:
    pool = BackendPool(["http://a/v1", "http://b/v1"], failure_threshold=3)
    a, b = pool.backends
    assert not pool.failed(a) and not pool.failed(a)
    pool.succeeded(a)  # a success in between resets the count
    assert [pool.failed(a) for _ in range(3)] == [False, False, True]
    assert a.open and pool.available == 1 and not pool.all_open
    assert all(pool.choose() is b for _ in range(4))  # a dead one is skipped
    assert not pool.failed(a)  # already out: opening again is not news
    assert pool.succeeded(a) and not a.open and a.failures == 0
    assert not pool.succeeded(a)  # closing a closed circuit is not news either


def test_every_backend_out_means_no_choice() -> None:
    pool = BackendPool(["http://a/v1", "http://b/v1"])
    assert pool.take_out(pool.backends[0])
    assert not pool.take_out(pool.backends[0])
    assert pool.choose() is pool.backends[1]
    pool.take_out(pool.backends[1])
    assert pool.all_open and pool.choose() is None


def test_requests_go_to_free_slots_and_a_node_lowers_its_own() -> None:
    pool = BackendPool(["http://a/v1", "http://b/v1"], max_per_backend=4)
    a, b = pool.backends
    assert pool.capacity == 8  # nothing said yet: the configured bound per server
    pool.advertised(a, 1)
    pool.advertised(b, 100)  # a node cannot raise the configured bound
    assert (a.slots, b.slots, pool.capacity) == (1, 4, 5)
    a.in_flight = 1
    b.in_flight = 3
    assert pool.choose() is b  # a is full although b has more in flight
    b.in_flight = 4
    assert pool.choose() is a  # every slot taken: the least busy one queues it
    pool.take_out(b)
    assert pool.capacity == 1  # only what is in service
    pool.take_out(a)
    assert pool.capacity == 5  # none in service: everything starts, and fails at once


def test_a_pool_needs_a_backend() -> None:
    with pytest.raises(ValueError):
        BackendPool([])


def test_wav_body_is_16khz_mono_16bit_and_clipped() -> None:
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0], np.float32)
    with wave.open(io.BytesIO(pcm16_wav(samples))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    assert pcm.tolist() == [0, 16383, -16383, 32767, -32767, 32767, -32767]


def test_backoff_doubles_then_caps() -> None:
    assert [backoff_s(n) for n in range(3)] == [0.1, 0.2, 0.4]
    assert backoff_s(20) == BACKOFF_MAX_S

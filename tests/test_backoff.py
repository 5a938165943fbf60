"""Reconnect delays and the shared attempt limiter."""

from __future__ import annotations

import threading

from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Backoff


def test_failure_delays_grow_to_the_cap_with_full_jitter() -> None:
    """Transient failures: delays double up to `maximum`, scaled by the jitter draw."""
    backoff = ReconnectBackoff(Backoff(initial=0.5, maximum=4.0), rand=lambda: 1.0)
    assert [backoff.after_failure() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    half = ReconnectBackoff(Backoff(initial=0.5, maximum=4.0), rand=lambda: 0.5)
    assert half.after_failure() == 0.25


def test_auth_failures_back_off_slowly_and_never_below_half_a_step() -> None:
    """401/403: equal jitter, so even a zero draw waits half the step; capped at auth_maximum."""
    backoff = ReconnectBackoff(Backoff(auth_initial=5.0, auth_maximum=300.0), rand=lambda: 0.0)
    delays = [backoff.after_auth_failure() for _ in range(9)]
    assert delays == [2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 150.0, 150.0, 150.0]


def test_a_stable_connection_resets_the_backoff() -> None:
    """A connection that lasted `stable_after` makes the next retry quick again."""
    backoff = ReconnectBackoff(Backoff(initial=1.0, stable_after=30.0), rand=lambda: 1.0)
    for _ in range(5):
        backoff.after_failure()
    backoff.connection_lasted(5.0)
    assert backoff.after_failure() == 32.0 or backoff.after_failure() > 1.0
    backoff.connection_lasted(31.0)
    assert backoff.after_failure() == 1.0


def test_limiter_allows_a_burst_then_the_rate() -> None:
    """The token bucket lets `burst` through at once, then `rate` per second of clock time."""
    now = [0.0]
    limiter = AttemptLimiter(rate=10.0, burst=3, clock=lambda: now[0])
    stop = threading.Event()
    assert all(limiter.acquire(stop) for _ in range(3))
    stop.set()
    assert not limiter.acquire(stop)  # empty bucket, and stop is set: gives up
    now[0] = 0.1
    assert limiter.acquire(threading.Event())  # one token refilled

"""Reconnect delays and the shared attempt limiter."""

from __future__ import annotations

import threading

import pytest

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


@pytest.mark.parametrize("lasted", [0.0, 5.0, 29.999])
def test_a_short_connection_keeps_the_backoff_growing(lasted: float) -> None:
    """A connection that ended before `stable_after` is no evidence of health: the next delays
    continue where the failures left them (a flapping upstream is not hammered)."""
    backoff = ReconnectBackoff(Backoff(initial=1.0, maximum=64.0, stable_after=30.0), lambda: 1.0)
    assert [backoff.after_failure() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    backoff.connection_lasted(lasted)
    assert [backoff.after_failure() for _ in range(2)] == [32.0, 64.0]


@pytest.mark.parametrize("lasted", [30.0, 3600.0])
def test_a_connection_that_lasted_stable_after_resets_the_backoff(lasted: float) -> None:
    """A connection that lived `stable_after` (or longer) makes the next retry quick again,
    and the delays then grow from `initial` as if nothing had failed before."""
    backoff = ReconnectBackoff(Backoff(initial=1.0, maximum=64.0, stable_after=30.0), lambda: 1.0)
    for _ in range(5):
        backoff.after_failure()
    backoff.connection_lasted(lasted)
    assert [backoff.after_failure() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_a_stable_connection_also_resets_the_authentication_backoff() -> None:
    """After a long good connection, a 401 (e.g. an expired token) starts at `auth_initial`
    again; a short connection leaves the slow authentication backoff where it was."""
    policy = Backoff(auth_initial=5.0, auth_maximum=300.0, stable_after=30.0)
    backoff = ReconnectBackoff(policy, rand=lambda: 1.0)
    assert [backoff.after_auth_failure() for _ in range(3)] == [5.0, 10.0, 20.0]
    backoff.connection_lasted(29.0)
    assert backoff.after_auth_failure() == 40.0
    backoff.connection_lasted(30.0)
    assert backoff.after_auth_failure() == 5.0


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

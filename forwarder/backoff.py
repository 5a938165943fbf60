"""Reconnect delays and a shared connection-attempt limiter.

The upstream cannot resend, so after a drop we want to be back quickly; but hundreds of
subscriptions dropped at once (an upstream restart) must not hammer it. Two mechanisms:

* `ReconnectBackoff`: per subscription, capped exponential delays with *full jitter* for
  transient failures (a quick first retry), and *equal jitter* (never below half the step) for
  authentication failures, which only a human or a token rotation can fix.
* `AttemptLimiter`: one token bucket per process that every subscription passes before
  connecting, so the attempt rate is bounded whatever the number of subscriptions.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from forwarder.config import Backoff


class ReconnectBackoff:
    """Delay calculator for one subscription. Not thread-safe: owned by its subscriber thread."""

    def __init__(self, policy: Backoff, rand: Callable[[], float] = random.random) -> None:
        self._policy = policy
        self._rand = rand
        self._failures = 0
        self._auth_failures = 0

    def reset(self) -> None:
        """Forget past failures (after a connection that stayed up for `stable_after`)."""
        self._failures = 0
        self._auth_failures = 0

    def after_failure(self) -> float:
        """Delay before reconnecting after a drop, a close or a connect error."""
        step = min(self._policy.maximum, self._policy.initial * 2.0**self._failures)
        self._failures += 1
        return step * self._rand()

    def after_auth_failure(self) -> float:
        """Delay after HTTP 401/403: slow, never a hot loop, still jittered."""
        step = min(self._policy.auth_maximum, self._policy.auth_initial * 2.0**self._auth_failures)
        self._auth_failures += 1
        return step / 2.0 + step / 2.0 * self._rand()

    def connection_lasted(self, seconds: float) -> None:
        """Tell the backoff how long the last connection stayed up."""
        if seconds >= self._policy.stable_after:
            self.reset()


class AttemptLimiter:
    """Token bucket shared by all subscriptions: at most `rate` connection attempts per second.

    Thread-safe. `acquire()` blocks until a token is free or `stop` is set.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Take one token; returns False if `stop` was set while waiting."""
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return True
                wait = (1.0 - self._tokens) / self._rate
            if stop.wait(wait):
                return False

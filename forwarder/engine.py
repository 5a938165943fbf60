"""The machinery under all subscriptions: a few I/O loops and one handshake pool.

The daemon decides *which* subscriptions run (daemon._apply); the engine runs them: it builds
each subscription's rules (subscription.py) on the least loaded loop, and stops them politely
(close frames, then the echo) or at once. Threads, all owned here:
    io-N          the selector loops (loop.py): `[io] loops`, one by default
    handshake-N   the handshake pool (handshake.py), `io.handshake_threads` of them
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from forwarder.actions import SYSTEM_CLOCK, Clock
from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import IOConfig, SourceConfig, Subscription
from forwarder.handshake import Connector, HandshakePool, websocket_connect
from forwarder.link import CLOSE_ECHO_TIMEOUT
from forwarder.loop import Countdown, IOLoop
from forwarder.spool import DiskSpool
from forwarder.stats import SubscriptionStats
from forwarder.subscription import SubscriptionRules
from forwarder.tokens import token_expiry

log = logging.getLogger(__name__)

MAX_DEFAULT_LOOPS = 4  # with one interpreter lock, more loops only add contention
TOKEN_CACHE_SECONDS = 30.0


def default_loops() -> int:
    """One loop per CPU core this process may run on, at most MAX_DEFAULT_LOOPS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_LOOPS, cores))


class TokenExpiries:
    """The exp claim of each source's current token, re-read at most every 30 s, so that the
    13 subscriptions of a source do not each read its token file. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, float | None]] = {}

    def reader(self, source: SourceConfig) -> Callable[[], float | None]:
        return lambda: self.expiry(source)

    def expiry(self, source: SourceConfig) -> float | None:
        """Raises ConfigError when the token cannot be read."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(source.name)
            if cached is not None and now - cached[0] < TOKEN_CACHE_SECONDS:
                return cached[1]
        exp = token_expiry(source.token.read())
        with self._lock:
            self._cache[source.name] = (now, exp)
        return exp


class Engine:
    """`start()`, `add()`/`stop()` subscriptions from one controlling thread (the daemon's
    main thread), `shutdown()`. Loops and workers report bugs in `failures()`."""

    def __init__(
        self,
        io: IOConfig,
        spool: DiskSpool,
        connect: Connector = websocket_connect,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        self.limiter = AttemptLimiter(io.connect_rate, io.connect_burst)
        self.pool = HandshakePool(io.handshake_threads, self.limiter, connect)
        count = io.loops or default_loops()
        self.loops = [IOLoop(f"io-{i}", spool, self.pool, clock.monotonic) for i in range(count)]
        self._load = [0] * count  # subscriptions placed on each loop (controlling thread only)
        self._where: dict[SubscriptionRules, int] = {}
        self._tokens = TokenExpiries(clock.monotonic)

    def start(self) -> None:
        self.pool.start()
        for loop in self.loops:
            loop.start()

    def add(
        self,
        index: int,
        subscription: Subscription,
        stats: SubscriptionStats,
        backoff: ReconnectBackoff,
        resume_from: float | None = None,
        **fleet: Any,
    ) -> SubscriptionRules:
        """Start a subscription on the least loaded loop; returns its rules (read-only here).

        `fleet`: fleet mode's hooks, passed to SubscriptionRules (may_connect, lease_deadline,
        on_connected, resume_cause)."""
        n = min(range(len(self.loops)), key=self._load.__getitem__)
        loop = self.loops[n]
        rules = SubscriptionRules(
            index,
            subscription,
            stats,
            backoff,
            loop.outbox,
            clock=self._clock,
            token_expiry=self._tokens.reader(subscription.source),
            resume_from=resume_from,
            **fleet,
        )
        self._load[n] += 1
        self._where[rules] = n
        loop.add(rules)
        return rules

    def stop(self, rules: Iterable[SubscriptionRules], deadline: float) -> None:
        """Stop subscriptions politely, then cut what did not finish by `deadline` (monotonic).

        Blocks until they have finished or the deadline (plus a second for the cut) passed."""
        by_loop: dict[int, list[SubscriptionRules]] = {}
        for r in rules:
            n = self._where.pop(r, None)
            if n is not None:
                self._load[n] -= 1
                by_loop.setdefault(n, []).append(r)
        if not by_loop:
            return
        done = Countdown(sum(len(v) for v in by_loop.values()))
        for n, targets in by_loop.items():
            self.loops[n].stop_subscriptions(targets, done)
        if done.wait(deadline - time.monotonic()):
            return
        for n, targets in by_loop.items():
            self.loops[n].abort_subscriptions(targets)
        done.wait(1.0)

    def call(self, rules: SubscriptionRules, fn: Callable[[], None]) -> None:
        """Run `fn` (an input of `rules`, e.g. `rules.permission_changed`) on the loop that
        owns them, and carry out what they ask for. Any thread; never blocks."""
        n = self._where.get(rules)
        if n is not None:
            self.loops[n].input(rules, fn)

    def shutdown(self, deadline: float) -> None:
        """Stop everything: no new handshakes, close frames on every connection and their
        echoes for up to CLOSE_ECHO_TIMEOUT (within `deadline`), then cut the rest."""
        # 1. No new connections: queued handshakes are dropped.
        self.pool.stop()
        # 2. Close frames everywhere; frames still in flight are read and spooled meanwhile.
        for loop in self.loops:
            loop.shutdown()
        grace = min(time.monotonic() + CLOSE_ECHO_TIMEOUT + 0.5, deadline)
        for loop in self.loops:
            loop.join(grace - time.monotonic())
        # 3. What did not answer in time: cut the sockets; nothing more is received.
        for loop in self.loops:
            loop.force()
        for loop in self.loops:
            loop.join(max(0.1, min(1.0, deadline - time.monotonic())))
        # 4. Handshake workers: daemon threads; one stuck in a slow handshake is not waited for.
        self.pool.join(0.2)
        self._where.clear()

    def failures(self) -> list[str]:
        """Names of the subscriptions, loops and workers that died of a bug."""
        dead = [rules.name for loop in self.loops for rules in list(loop.crashed)]
        dead += [loop.name for loop in self.loops if loop.failed is not None]
        if self.pool.failed is not None:
            dead.append("handshake-pool")
        return dead

    def dead(self) -> list[str]:
        """Threads that should run but do not (for /healthz), crashed or not."""
        dead = [loop.name for loop in self.loops if not loop.is_alive()]
        if not self.pool.is_alive():
            dead.append("handshake-pool")
        return dead

"""What /healthz, /readyz and systemd's WATCHDOG=1 say: one judgement of the daemon's parts.

`Checks` reads the parts the daemon owns (writer, engine, spool, discovery, consumers
monitor, fleet) and never changes them. `health`, `ready` and `failed_threads` are called
from HTTP threads and the main loop: every value they read is documented as safe to read
from any thread by its owner (stats lists replaced copy-on-write, flags and counters
assigned whole). `progressing` keeps a mark between calls and belongs to the main loop.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

from forwarder.config import Config
from forwarder.consumers import StreamMonitor
from forwarder.discovery import DiscoveryPoller
from forwarder.engine import Engine
from forwarder.fleet_glue import FleetGlue
from forwarder.logs import redact
from forwarder.sink import IDLE_PING_SECONDS, RedisWriter
from forwarder.spool import DiskSpool
from forwarder.stats import State, SubscriptionStats, WriterStats

# Redis must have answered within this many seconds for /readyz.
REDIS_READY_AGE = 3 * IDLE_PING_SECONDS
# The writer loop turns at least every IDLE_PING_SECONDS (and every second while retrying);
# this long without a turn means it is wedged, and systemd should restart us.
WRITER_STALL_SECONDS = 4 * IDLE_PING_SECONDS

_state = operator.attrgetter("state")


class Checks:
    """Health (threads alive), readiness (able to do the job) and watchdog evidence."""

    def __init__(
        self,
        config: Config,
        *,
        writer: RedisWriter,
        writer_stats: WriterStats,
        engine: Engine,
        spool: DiskSpool,
        discovery: DiscoveryPoller,
        consumers: StreamMonitor,
        fleet: FleetGlue | None,
        stats: Callable[[], Sequence[SubscriptionStats]],
        running: Callable[[], int],
        stopping: Callable[[], bool],
    ) -> None:
        self._config = config
        self._writer = writer
        self._writer_stats = writer_stats
        self._engine = engine
        self._spool = spool
        self._discovery = discovery
        self._consumers = consumers
        self._fleet = fleet
        self._stats = stats  # the current list: replaced whole by reloads, read here
        self._running = running  # how many subscriptions run now
        self._stopping = stopping
        self._writer_progress = -1  # last seen RedisWriter.progress, and when it changed
        self._writer_progress_at = time.monotonic()

    def failed_threads(self) -> list[str]:
        """Threads that crashed (not merely stopped): a reason to exit for systemd to restart."""
        failed = self._engine.failures()  # crashed subscriptions, loops and workers
        if self._writer.failed is not None:
            failed.append("redis-writer")
        if self._discovery.failed is not None:
            failed.append("discovery")
        if self._consumers.failed is not None:
            failed.append("consumers")
        if self._spool.failed is not None:
            failed.append("spool-fsync")
        if self._fleet is not None and self._fleet.failed():
            failed.append("fleet")
        return failed

    def progressing(self, now: float) -> bool:
        """Evidence for WATCHDOG=1: no thread died, the loops run, the writer loop turns.

        Main loop only: it keeps the writer's last progress mark between calls.
        """
        if self.failed_threads() or not self._writer.is_alive():
            return False
        if self._engine.dead():
            return False
        progress = self._writer.progress
        if progress != self._writer_progress:
            self._writer_progress = progress
            self._writer_progress_at = now
        return now - self._writer_progress_at < WRITER_STALL_SECONDS

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every thread that should run is running."""
        dead = self.failed_threads()
        if not self._stopping():
            dead += self._engine.dead()
            if not self._writer.is_alive():
                dead.append("redis-writer")
            if not self._consumers.is_alive():
                dead.append("consumers")
            if self._fleet is not None and not self._fleet.alive():
                dead.append("fleet")
        return not dead, {"healthy": not dead, "dead_threads": sorted(set(dead))}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when Redis takes our writes and enough subscriptions are connected.

        Policy: Redis answered the writer within REDIS_READY_AGE seconds and is not refusing
        writes for a configuration error (NOPERM, WRONGTYPE), at least
        `metrics.ready_min_connected` (a fraction, default 1.0 = all) of the subscriptions
        are connected, the spool can write to its disk (and lost nothing in the last minute),
        the fleet member (if any) is healthy, and the daemon is not shutting down.
        """
        last_ok = self._writer_stats.last_ok_at
        redis_ok = (
            last_ok is not None
            and time.monotonic() - last_ok <= REDIS_READY_AGE
            and self._writer_stats.config_error is None
        )
        # In C (attrgetter, list.count): called every STATUS_INTERVAL over 10,000 stats.
        connected = list(map(_state, self._stats())).count(State.CONNECTED)
        total = self._running()
        min_ratio = self._config.metrics.ready_min_connected
        enough = connected >= min_ratio * total
        # Until each [[discovery]] table has had one believed listing we do not know what to
        # subscribe to; later failures keep the last set running (the alert rule covers them).
        waiting = self._discovery.never_listed()
        consumers_ok, consumers_error = self._consumers.readiness()
        spool_problem = self._spool.problem()
        fleet = self._fleet
        fleet_ok, fleet_reason = fleet.health() if fleet is not None else (True, None)
        stopping = self._stopping()
        ok = (
            fleet_ok
            and redis_ok
            and enough
            and not waiting
            and consumers_ok
            and spool_problem is None
            and not stopping
        )
        return ok, {
            "ready": ok,
            "redis_ok": redis_ok,
            "redis_reason": None if redis_ok else self._redis_reason(last_ok),
            "spool_ok": spool_problem is None,
            "spool_problem": spool_problem,
            "discovery_waiting_for_first_listing": waiting,
            "consumers_error": redact(consumers_error) if consumers_error else None,
            "connected": connected,
            "subscriptions": total,
            "min_connected_ratio": min_ratio,
            "stopping": stopping,
            **({"fleet_ok": fleet_ok, "fleet_reason": fleet_reason} if fleet else {}),
        }

    def _redis_reason(self, last_ok: float | None) -> str:
        """Why Redis does not count as taking our writes (for /readyz), redacted."""
        stats = self._writer_stats
        last_error = f" (last error: {redact(stats.last_error)})" if stats.last_error else ""
        if stats.config_error is not None:
            return redact(stats.config_error)
        if last_ok is None:
            return "no answer from Redis yet" + last_error
        return f"no answer from Redis for {REDIS_READY_AGE:.0f}s" + last_error

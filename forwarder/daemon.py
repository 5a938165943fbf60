"""The daemon: builds the threads from a Config, runs them, and shuts them down in order.

Threads and their owner (this object):
    sub:SOURCE/EVENT  one per subscription (subscriber.Subscriber)
    redis-writer      drains the spool into Redis (sink.RedisWriter)
    http              /metrics /healthz /readyz /status (http.HttpServer)
The main thread only waits on `stop_event` and watches the others.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import redis

from forwarder import __version__
from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Config, redact_url
from forwarder.errors import ExitCode
from forwarder.http import HttpServer
from forwarder.logs import redact
from forwarder.metrics import ForwarderCollector, build_registry
from forwarder.sink import IDLE_PING_SECONDS, RedisWriter, make_client
from forwarder.spool import DiskSpool, Route
from forwarder.stats import State, SubscriptionStats, WriterStats
from forwarder.subscriber import CLOSE_ECHO_TIMEOUT, Connector, Subscriber, websocket_connect

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl+C in a terminal
    signal.SIGTERM,  # systemctl stop, docker stop, kill
)
# Connection attempts per second across all subscriptions: 1,000 subscriptions dropped at once
# come back within ~10 s without a spike at the upstream.
CONNECT_RATE = 100.0
CONNECT_BURST = 20
# Redis must have answered within this many seconds for /readyz.
REDIS_READY_AGE = 3 * IDLE_PING_SECONDS


class Forwarder:
    """Owns every thread. Use `run()` from the main thread, or `start()`/`shutdown()`."""

    def __init__(
        self,
        config: Config,
        client: redis.Redis | None = None,
        connect: Connector = websocket_connect,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.subscriptions = config.subscriptions()
        self.writer_stats = WriterStats()
        # The spool first: it may hold frames of an earlier run (even of subscriptions no
        # longer configured); those get stats too, so /metrics shows them draining.
        routes = [
            Route(s.source.name, s.event, s.stream, s.dead_letter_stream)
            for s in self.subscriptions
        ]
        self.spool = DiskSpool(
            config.spool.dir,
            routes,
            max_bytes=config.spool.max_bytes,
            fsync_interval=config.spool.fsync_interval,
            cache_bytes=config.spool.memory_bytes,
        )
        self.stats = [SubscriptionStats(r.source, r.event, r.stream) for r in self.spool.routes]
        self.client = client if client is not None else make_client(config.redis)
        self.stop_event = threading.Event()
        self._signalled = False
        self._started_at = time.time()
        self._stopping = False
        limiter = AttemptLimiter(CONNECT_RATE, CONNECT_BURST)
        self.subscribers = [
            Subscriber(
                i,
                sub,
                self.stats[i],
                self.spool,
                limiter,
                ReconnectBackoff(sub.source.backoff, rand),
                connect,
            )
            for i, sub in enumerate(self.subscriptions)
        ]
        self.writer = RedisWriter(
            self.client, self.spool, self.stats, self.writer_stats, config.redis, rand
        )
        collector = ForwarderCollector(lambda: self.stats, self.writer_stats, self.spool)
        self.registry = build_registry(collector)
        self.http = HttpServer(
            config.metrics.host,
            config.metrics.port,
            self.registry,
            self.health,
            self.ready,
            self.status,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> ExitCode:
        """Start, wait for SIGTERM/SIGINT, shut down. Main thread only."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        try:
            self.start()
            while not self.stop_event.wait(1.0):
                self._watch()
            return self.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only flags here: a handler can interrupt any bytecode, including a Redis call.
        if self._signalled:
            os.write(2, b"forwarder: second signal, exiting at once\n")
            os._exit(ExitCode.FORCED)
        self._signalled = True
        self.stop_event.set()

    def start(self) -> None:
        """Bind the HTTP port and start every thread; returns at once."""
        self.http.start()
        self.spool.start()
        self.writer.start()
        for subscriber in self.subscribers:
            subscriber.start()
        log.info(
            "forwarder %s started: %d subscriptions from %d sources to %s; metrics on http://%s:%d",
            __version__,
            len(self.subscribers),
            len(self.config.sources),
            redact_url(self.config.redis.url),
            self.config.metrics.host,
            self.http.port,
        )

    def shutdown(self) -> ExitCode:
        """Stop everything in order within `shutdown_timeout`; returns the exit code."""
        self._stopping = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("shutting down: %d frames waiting for Redis", self.spool.pending()[0])
        # 1. Subscriptions: send close frames and keep reading until the server echoes them,
        #    so frames already in flight are still spooled.
        for subscriber in self.subscribers:
            subscriber.stop()
        grace = min(time.monotonic() + CLOSE_ECHO_TIMEOUT, deadline)
        for subscriber in self.subscribers:
            subscriber.join(max(0.0, grace - time.monotonic()))
        # 2. Whatever did not answer in time: cut the socket; nothing more is received.
        for subscriber in self.subscribers:
            subscriber.force_stop()
        for subscriber in self.subscribers:
            subscriber.join(max(0.1, min(1.0, deadline - time.monotonic())))
        # 3. Writer: write everything spooled; keep 0.5 s for the last steps. What Redis
        #    does not take in time stays in the spool for the next start.
        self.writer.stop(deadline - 0.5)
        self.writer.join(max(0.1, deadline - time.monotonic()))
        # 4. Spool: fsync, save the cursor, release the directory lock.
        self.spool.close()
        pending, _ = self.spool.pending()
        # 5. HTTP last, so /metrics can be scraped during the drain.
        self.http.stop()
        self.http.join(1.0)
        # 6. Redis connections.
        self.client.close()
        failed = self._failed_threads()
        if pending:
            log.warning(
                "stopped with %d frames in the spool (%s): they are written after the next start",
                pending,
                self.config.spool.dir,
            )
        log.info("stopped")
        return ExitCode.FAILURE if failed else ExitCode.OK

    def _watch(self) -> None:
        failed = self._failed_threads()
        if failed:
            log.error("threads died (%s): stopping so that systemd restarts us", ", ".join(failed))
            self.stop_event.set()

    def _failed_threads(self) -> list[str]:
        failed = [s.name for s in self.subscribers if s.failed is not None]
        if self.writer.failed is not None:
            failed.append("redis-writer")
        return failed

    # -- health, readiness, status (called from HTTP threads) --------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every thread that should run is running."""
        dead = self._failed_threads()
        if not self._stopping:
            dead += [s.name for s in self.subscribers if not s.is_alive()]
            if not self.writer.is_alive():
                dead.append("redis-writer")
        return not dead, {"healthy": not dead, "dead_threads": sorted(set(dead))}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when Redis answered recently and enough subscriptions are connected.

        Policy: Redis answered the writer within REDIS_READY_AGE seconds, and at least
        `metrics.ready_min_connected` (a fraction, default 1.0 = all) of the subscriptions
        are connected, and the daemon is not shutting down.
        """
        last_ok = self.writer_stats.last_ok_at
        redis_ok = last_ok is not None and time.monotonic() - last_ok <= REDIS_READY_AGE
        connected = sum(1 for s in self.stats if s.state is State.CONNECTED)
        total = len(self.stats)
        enough = connected >= self.config.metrics.ready_min_connected * total
        ok = redis_ok and enough and not self._stopping
        return ok, {
            "ready": ok,
            "redis_ok": redis_ok,
            "connected": connected,
            "subscriptions": total,
            "min_connected_ratio": self.config.metrics.ready_min_connected,
            "stopping": self._stopping,
        }

    def status(self) -> dict[str, Any]:
        now = time.time()
        mono = time.monotonic()
        pending, nbytes = self.spool.pending()
        last_ok = self.writer_stats.last_ok_at
        ready, _ = self.ready()
        return {
            "version": __version__,
            "uptime_seconds": round(now - self._started_at, 3),
            "ready": ready,
            "redis": {
                "url": redact_url(self.config.redis.url),
                "last_success_age_seconds": None if last_ok is None else round(mono - last_ok, 3),
                "last_error": redact(self.writer_stats.last_error or "") or None,
                "errors": dict(self.writer_stats.errors),
                "config_error": redact(self.writer_stats.config_error or "") or None,
            },
            "spool": {
                "dir": str(self.config.spool.dir),
                "pending_messages": pending,
                "pending_bytes": nbytes,
                "disk_bytes": self.spool.disk_bytes(),
                "max_bytes": self.spool.max_bytes,
                "corrupt_records": self.spool.stats.corrupt_records,
            },
            "subscriptions": [self._subscription_status(s, now) for s in self.stats],
        }

    @staticmethod
    def _subscription_status(s: SubscriptionStats, now: float) -> dict[str, Any]:
        def age(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 3)

        return {
            "source": s.source,
            "event": s.event,
            "stream": s.stream,
            "state": s.state.value,
            "connected": s.state is State.CONNECTED,
            "connected_for_seconds": age(s.connected_since),
            "received": s.received,
            "forwarded": s.forwarded,
            "dropped": s.dropped,
            "lost": s.lost,
            "dead_lettered": dict(s.invalid),
            "reconnects": s.reconnects,
            "last_message_age_seconds": age(s.last_message_at),
            "last_close_code": s.last_close_code,
            "last_handshake_status": s.last_handshake_status,
            "last_error": redact(s.last_error) if s.last_error else None,
            "next_attempt_in_seconds": (
                None if s.next_attempt_at is None else round(max(0.0, s.next_attempt_at - now), 3)
            ),
            "close_codes": dict(s.close_codes),
            "handshake_failures": dict(s.handshake_failures),
        }

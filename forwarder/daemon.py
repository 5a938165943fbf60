"""The daemon: builds the threads from a Config, runs them, and shuts them down in order.

Threads and their owner (this object):
    sub:SOURCE/EVENT  one per subscription (subscriber.Subscriber)
    discovery         polls [[discovery]] listings (discovery.DiscoveryPoller)
    redis-writer      drains the spool into Redis (sink.RedisWriter)
    http              /metrics /healthz /readyz /status (http.HttpServer)
    consumers         stream and consumer-group metrics, retention "acked" (consumers.StreamMonitor)
The main thread only waits on `stop_event` and watches the others.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any

import redis

from forwarder import __version__
from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Config, Subscription, redact_url
from forwarder.consumers import ConsumerCollector, build_monitor
from forwarder.desired import desired, plan, removed_gap
from forwarder.discovery import DiscoveryCollector, DiscoveryPoller, Fetcher
from forwarder.errors import ConfigError, ExitCode
from forwarder.http import HttpServer
from forwarder.listing import fetch_listing
from forwarder.logs import redact
from forwarder.metrics import ForwarderCollector, build_registry, source_labelled
from forwarder.notify import Notifier, format_status
from forwarder.problems import HealthPolicy, ProblemFinder
from forwarder.redis_target import RedisTarget, make_target
from forwarder.retention import writer_config
from forwarder.signals import StartupSignals
from forwarder.sink import IDLE_PING_SECONDS, RedisWriter
from forwarder.spool import DiskSpool, Route, entry_size
from forwarder.stats import State, SubscriptionStats, WriterStats
from forwarder.status import StatusReport
from forwarder.subscriber import CLOSE_ECHO_TIMEOUT, Connector, Subscriber, websocket_connect

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl+C in a terminal
    signal.SIGTERM,  # systemctl stop, docker stop, kill
)
RELOAD_SIGNAL = signal.SIGHUP  # systemctl reload (ExecReload=kill -HUP)
# Connection attempts per second across all subscriptions: 1,000 subscriptions dropped at once
# come back within ~10 s without a spike at the upstream.
CONNECT_RATE = 100.0
CONNECT_BURST = 20
# Redis must have answered within this many seconds for /readyz.
REDIS_READY_AGE = 3 * IDLE_PING_SECONDS
# The writer loop turns at least every IDLE_PING_SECONDS (and every second while retrying);
# this long without a turn means it is wedged, and systemd should restart us.
WRITER_STALL_SECONDS = 4 * IDLE_PING_SECONDS


class Forwarder:
    """Owns every thread. Use `run()` from the main thread, or `start()`/`shutdown()`."""

    def __init__(
        self,
        config: Config,
        target: RedisTarget | None = None,
        connect: Connector = websocket_connect,
        rand: Callable[[], float] = random.random,
        notifier: Notifier | None = None,
        watchdog_every: float | None = None,
        reload: Callable[[], Config] | None = None,
        fetch: Fetcher | None = None,
    ) -> None:
        self.config = config
        self._load = reload  # re-reads the configuration on SIGHUP; None: reload unsupported
        self._reload_requested = False  # set by the SIGHUP handler, read by the main loop
        self._rand = rand
        self._connect = connect
        # systemd: READY/STATUS/WATCHDOG/STOPPING (a no-op outside systemd).
        self.notifier = notifier if notifier is not None else Notifier(None)
        self._watchdog_every = watchdog_every  # seconds between WATCHDOG=1, None: off
        subscriptions = config.subscriptions()
        self.writer_stats = WriterStats()
        # The spool first: it may hold frames of an earlier run (even of subscriptions no
        # longer configured); those get stats too, so /metrics shows them draining.
        routes = [_route(sub) for sub in subscriptions]
        self.spool = DiskSpool(
            config.spool.dir,
            routes,
            max_bytes=config.spool.max_bytes,
            fsync_interval=config.spool.fsync_interval,
            cache_bytes=config.spool.memory_bytes,
        )
        self.stats = [
            SubscriptionStats(r.source, r.event, r.stream, configured=i < len(routes))
            for i, r in enumerate(self.spool.routes)
        ]
        # Single Redis, Sentinel or Cluster; it connects on first use, in the writer thread.
        self.target = target if target is not None else make_target(config.redis)
        self.stop_event = threading.Event()
        self._signalled = False
        self._started_at = time.time()
        self._stopping = False
        self._writer_progress = -1  # last seen RedisWriter.progress, and when it changed
        self._writer_progress_at = time.monotonic()
        self._limiter = AttemptLimiter(CONNECT_RATE, CONNECT_BURST)
        self.subscribers = [self._subscriber(i, sub) for i, sub in enumerate(subscriptions)]
        self.writer = RedisWriter(
            self.target,
            self.spool,
            self.stats,
            self.writer_stats,
            writer_config(config.redis),
            rand,
        )
        # The monitor's calls read several streams at once; on a Cluster they would span
        # slots, so there it is off (config.py refuses retention "acked" with a Cluster).
        monitor_client = getattr(self.target, "client", None)
        if monitor_client is None:
            config = replace(config, consumers=replace(config.consumers, interval=0.0))
            monitor_client = redis.Redis()  # never used: an interval of 0 makes no call
        self.consumers = build_monitor(
            config,
            monitor_client,
            lambda: [route.stream for route in list(self.spool.routes)],
            self.writer_stats,
            lambda: self.spool.pending()[0],
            stale_after=REDIS_READY_AGE,
        )
        # One judgement of "unhealthy" for /metrics and /status (problems.py).
        self.problems = ProblemFinder(
            HealthPolicy(dict(config.metrics.stall_after), started_at=self._started_at)
        )
        collector = ForwarderCollector(
            lambda: self.stats,
            self.writer_stats,
            self.spool,
            self.problems,
            detail=config.metrics.detail,
            by_source=source_labelled(config.metrics.source_label, len(config.sources)),
        )
        self.registry = build_registry(collector)
        # Discovery feeds the desired set: every poll that changes the instances reconciles
        # (on the poller thread) through the same path as a reload, under _apply_lock.
        self._apply_lock = threading.Lock()
        self.discovery = DiscoveryPoller(
            config.discovery, self._discovery_changed, fetch or fetch_listing
        )
        self.registry.register(DiscoveryCollector(self.discovery))
        self._status_report = StatusReport(
            lambda: self.stats,
            self.spool,
            self.writer_stats,
            self.problems,
            lambda: self.ready()[0],
            redact_url(config.redis.url),
            str(config.spool.dir),
            self._started_at,
            sections={"discovery": self.discovery.status},
            redis_extra=lambda: {
                **self.target.describe(),  # topology, current master(s)
                "replayed": self.writer_stats.replayed,
            },
        )
        self.registry.register(ConsumerCollector(self.consumers))
        self.http = HttpServer(
            config.metrics.host,
            config.metrics.port,
            self.registry,
            self.health,
            self.ready,
            self.status,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self, startup: StartupSignals | None = None) -> ExitCode:
        """Start, wait for SIGTERM/SIGINT, shut down. Main thread only.

        `startup` holds the signals that arrived before this (see signals.py): a stop
        request exits at once without starting, a reload request reloads once running.
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        previous[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, self._on_reload_signal)
        # Read after our handlers are in place, so no signal falls between the two.
        if startup is not None and startup.stop_requested:
            self._signalled = True
            self.stop_event.set()
        if startup is not None and startup.reload_requested:
            self._reload_requested = True
        try:
            if self.stop_event.is_set():
                log.info("stop requested while starting: exiting without connecting")
                self.notifier.stopping()
                return self.shutdown()
            self.start()
            # Ready once configuration, spool and metrics are up: not gated on the upstream,
            # or an upstream outage would become a start-up timeout and a restart loop.
            self.notifier.ready()
            status = ""
            watchdog_at = 0.0
            while not self.stop_event.wait(1.0):
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                self._watch()
                line = self._status_line()
                if line != status:
                    status = line
                    self.notifier.status(line)
                now = time.monotonic()
                every = self._watchdog_every
                if every is not None and now - watchdog_at >= every and self._progressing(now):
                    self.notifier.watchdog()
                    watchdog_at = now
            self.notifier.stopping()
            self.notifier.extend_timeout(self.config.shutdown_timeout + 5.0)
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

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True  # the main loop reloads within a second

    def _subscriber(self, index: int, sub: Subscription) -> Subscriber:
        return Subscriber(
            index,
            sub,
            self.stats[index],
            self.spool,
            self._limiter,
            ReconnectBackoff(sub.source.backoff, self._rand),
            self._connect,
        )

    def reload(self) -> bool:
        """Apply the configuration file again (SIGHUP). Main thread only.

        Subscriptions whose settings did not change keep their connections; removed ones
        stop, added ones start, changed ones restart. A new token in a token file needs no
        reload: it is read before every connection attempt. Redis, metrics and spool
        settings need a restart (a WARNING says so). An invalid file is refused with an
        ERROR and the running configuration stays.
        """
        if self._load is None:
            log.warning("SIGHUP ignored: this forwarder was started without a reloadable file")
            return False
        self.notifier.reloading()
        try:
            new = self._load()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            self.notifier.ready()
            return False
        old = self.config
        for name in ("redis", "metrics", "spool", "consumers"):
            if getattr(old, name) != getattr(new, name):
                log.warning("reload: [%s] changed; that takes effect after a restart", name)
        logging.getLogger().setLevel(new.log_level)
        with self._apply_lock:
            self.discovery.reconfigure(new.discovery)
            kept, started, stopped = self._apply(new, "removed from the configuration by a reload")
            self.config = replace(
                new, redis=old.redis, metrics=old.metrics, spool=old.spool, consumers=old.consumers
            )
        log.info(
            "reloaded %s: %d subscriptions kept, %d started, %d stopped",
            new.path or "the configuration",
            kept,
            started,
            stopped,
        )
        self.notifier.ready()
        return True

    def _discovery_changed(self) -> None:
        """Discovery added or removed instances (poller thread): reconcile."""
        with self._apply_lock:
            if self._stopping:
                return
            self._apply(self.config, "instance no longer listed by discovery")

    def _apply(self, config: Config, why_removed: str) -> tuple[int, int, int]:
        """Reconcile the running subscribers with the desired set; under _apply_lock.

        Returns (kept, started, stopped). Stops what leaves (or changes) first, politely,
        so the upstream slots are free; a subscription that leaves for good gets a last gap
        record with cause `removed`. Replaces `self.subscribers` (a new list: other threads
        iterate it).
        """
        result = desired(config, self.discovery.discovered())
        self.discovery.refused(result.refused)
        wanted = result.subscriptions
        running = {s.subscription.key: s for s in self.subscribers}
        steps = plan({k: s.subscription for k, s in running.items()}, wanted)
        leaving = [running[k] for k in steps.stop]
        # Out of the list first: /healthz and the watchdog must not take a subscriber that is
        # stopping on purpose for a dead thread.
        self.subscribers = [running[k] for k in steps.keep]
        for subscriber in leaving:
            subscriber.stop()
        grace = time.monotonic() + CLOSE_ECHO_TIMEOUT
        for subscriber in leaving:
            subscriber.join(max(0.0, grace - time.monotonic()))
            subscriber.force_stop()
            subscriber.join(1.0)
            self.stats[subscriber.index].configured = False
        now = time.time()
        for key in steps.gone:
            entry = removed_gap(running[key].index, now, why_removed)
            if not self.spool.append([entry], entry_size(entry)):
                log.warning("%s/%s: spool full: its `removed` gap record is lost", *key)
        started = []
        for sub in steps.start:
            route = _route(sub)
            index = self.spool.add_route(route)
            while len(self.stats) <= index:  # stats are indexed like the spool's routes
                self.stats.append(SubscriptionStats(route.source, route.event, route.stream))
            self.stats[index].configured = True
            subscriber = self._subscriber(index, sub)
            subscriber.start()
            started.append(subscriber)
        self.subscribers = self.subscribers + started
        if steps.gone or started:
            log.info(
                "subscriptions: %d started, %d stopped, %d kept (%d sources)",
                len(started),
                len(leaving),
                len(steps.keep),
                len({s.subscription.source.name for s in self.subscribers}),
            )
        return len(steps.keep), len(started), len(leaving)

    def start(self) -> None:
        """Bind the HTTP port and start every thread; returns at once."""
        self.http.start()
        self.spool.start()
        self.writer.start()
        self.consumers.start()
        for subscriber in self.subscribers:
            subscriber.start()
        self.discovery.start()  # the first poll at once: instances subscribe within it
        log.info(
            "forwarder %s started: %d subscriptions from %d sources and %d discovery tables to "
            "%s; metrics on http://%s:%d",
            __version__,
            len(self.subscribers),
            len(self.config.sources),
            len(self.config.discovery),
            redact_url(self.config.redis.url),
            self.config.metrics.host,
            self.http.port,
        )

    def shutdown(self) -> ExitCode:
        """Stop everything in order within `shutdown_timeout`; returns the exit code."""
        self._stopping = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("shutting down: %d frames waiting for Redis", self.spool.pending()[0])
        # 0. Discovery first, so no poll starts or stops subscriptions from here on. A request
        #    in flight is not waited for (request_timeout bounds it; _stopping makes its
        #    result a no-op); the lock waits for a reconciliation under way.
        self.discovery.stop()
        self.discovery.join(0.5)
        with self._apply_lock:
            pass
        # 0b. Consumer-group monitor: no new rounds, so the drain below has Redis to itself.
        self.consumers.stop()
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
        self.consumers.join(max(0.1, min(1.0, deadline - time.monotonic())))
        # 4. Spool: frames only in memory go to disk if it takes them (else they are counted
        #    lost); fsync, save the cursor, release the lock. pending() then counts only
        #    what is safe on disk, so the line below never claims more.
        self.spool.close()
        pending, _ = self.spool.pending()
        # 5. HTTP last, so /metrics can be scraped during the drain.
        self.http.stop()
        self.http.join(1.0)
        # 6. Redis connections.
        self.target.close()
        failed = self._failed_threads()
        if pending:
            log.warning(
                "stopped with %d frames in the spool (%s): they are written after the next start",
                pending,
                self.config.spool.dir,
            )
        log.info("stopped")
        return ExitCode.FAILURE if failed else ExitCode.OK

    def _status_line(self) -> str:
        _, info = self.ready()
        return format_status(
            info["connected"], info["subscriptions"], self.spool.pending()[0], info["redis_ok"]
        )

    def _progressing(self, now: float) -> bool:
        """Evidence for WATCHDOG=1: no thread died, subscribers run, the writer loop turns."""
        if self._failed_threads() or not self.writer.is_alive():
            return False
        if not all(s.is_alive() for s in self.subscribers):
            return False
        progress = self.writer.progress
        if progress != self._writer_progress:
            self._writer_progress = progress
            self._writer_progress_at = now
        return now - self._writer_progress_at < WRITER_STALL_SECONDS

    def _watch(self) -> None:
        failed = self._failed_threads()
        if failed:
            log.error("threads died (%s): stopping so that systemd restarts us", ", ".join(failed))
            self.stop_event.set()

    def _failed_threads(self) -> list[str]:
        failed = [s.name for s in self.subscribers if s.failed is not None]
        if self.writer.failed is not None:
            failed.append("redis-writer")
        if self.discovery.failed is not None:
            failed.append("discovery")
        if self.consumers.failed is not None:
            failed.append("consumers")
        if self.spool.failed is not None:
            failed.append("spool-fsync")
        return failed

    # -- health, readiness, status (called from HTTP threads) --------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every thread that should run is running."""
        dead = self._failed_threads()
        if not self._stopping:
            dead += [s.name for s in self.subscribers if not s.is_alive()]
            if not self.writer.is_alive():
                dead.append("redis-writer")
            if not self.consumers.is_alive():
                dead.append("consumers")
        return not dead, {"healthy": not dead, "dead_threads": sorted(set(dead))}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when Redis takes our writes and enough subscriptions are connected.

        Policy: Redis answered the writer within REDIS_READY_AGE seconds and is not refusing
        writes for a configuration error (NOPERM, WRONGTYPE), at least
        `metrics.ready_min_connected` (a fraction, default 1.0 = all) of the subscriptions
        are connected, the spool can write to its disk (and lost nothing in the last minute),
        and the daemon is not shutting down.
        """
        last_ok = self.writer_stats.last_ok_at
        redis_ok = (
            last_ok is not None
            and time.monotonic() - last_ok <= REDIS_READY_AGE
            and self.writer_stats.config_error is None
        )
        connected = sum(1 for s in self.stats if s.state is State.CONNECTED)
        total = len(self.subscribers)
        enough = connected >= self.config.metrics.ready_min_connected * total
        # Until each [[discovery]] table has had one believed listing we do not know what to
        # subscribe to; later failures keep the last set running (the alert rule covers them).
        waiting = self.discovery.never_listed()
        consumers_ok, consumers_error = self.consumers.readiness()
        spool_problem = self.spool.problem()
        ok = (
            redis_ok
            and enough
            and not waiting
            and consumers_ok
            and spool_problem is None
            and not self._stopping
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
            "min_connected_ratio": self.config.metrics.ready_min_connected,
            "stopping": self._stopping,
        }

    def _redis_reason(self, last_ok: float | None) -> str:
        """Why Redis does not count as taking our writes (for /readyz), redacted."""
        stats = self.writer_stats
        if stats.config_error is not None:
            return redact(stats.config_error)
        if last_ok is None:
            return "no answer from Redis yet" + (
                f" (last error: {redact(stats.last_error)})" if stats.last_error else ""
            )
        return f"no answer from Redis for {REDIS_READY_AGE:.0f}s" + (
            f" (last error: {redact(stats.last_error)})" if stats.last_error else ""
        )

    def status(
        self, query: Mapping[str, Sequence[str]] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """/status: (HTTP status, document); see status.py for the query parameters."""
        return self._status_report.build(query)


def _route(sub: Subscription) -> Route:
    """Where the spool sends a subscription's entries."""
    return Route(sub.source.name, sub.event, sub.stream, sub.dead_letter_stream)

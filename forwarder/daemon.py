"""The daemon: builds the threads from a Config, runs them, and shuts them down in order.

Threads and their owner (this object):
    io-N, handshake-N  the I/O loops and the handshake pool under every subscription
                       (engine.Engine; the subscriptions' rules are subscription.py)
    spool-fsync        fsyncs the spool (spool.DiskSpool)
    discovery          polls [[discovery]] listings (discovery.DiscoveryPoller)
    redis-writer       drains the spool into Redis (sink.RedisWriter)
    consumers          consumer-group metrics, retention "acked" (consumers.StreamMonitor)
    http               /metrics /healthz /readyz /status (http.HttpServer)
The main thread only waits on `stop_event`, applies reloads and watches the others.

Which subscriptions run is decided in one place, `_apply`: the desired set (desired.py: static
sources plus discovered instances) against what runs: start what is missing, stop what is
gone or changed, keep what is unchanged. Start-up, SIGHUP reload and discovery polls all go
through it (under `_apply_lock`); fleet leases can feed it the same way. Lists that other
threads read (`stats`, the running set) are replaced whole (copy-on-write), never changed in
place.
"""

from __future__ import annotations

import gc
import logging
import operator
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any, overload

import redis

from forwarder import __version__
from forwarder.backoff import ReconnectBackoff
from forwarder.checks import REDIS_READY_AGE, Checks
from forwarder.config import Config, Subscription, redact_url
from forwarder.consumers import ConsumerCollector, build_monitor
from forwarder.desired import desired, plan, removed_gap
from forwarder.discovery import DiscoveryCollector, DiscoveryPoller, Fetcher
from forwarder.engine import Engine
from forwarder.errors import ConfigError, ExitCode
from forwarder.fleet_glue import FleetGlue
from forwarder.handshake import Connector, websocket_connect
from forwarder.http import HttpServer
from forwarder.lastseen import SAVE_INTERVAL, LastSeen, Marks
from forwarder.limits import fds_needed, raise_fd_limit
from forwarder.link import CLOSE_ECHO_TIMEOUT
from forwarder.listing import fetch_listing
from forwarder.metrics import ForwarderCollector, build_registry, source_labelled
from forwarder.notify import Notifier, format_status
from forwarder.problems import HealthPolicy, ProblemFinder
from forwarder.redis_target import RedisTarget, make_target
from forwarder.retention import writer_config
from forwarder.signals import StartupSignals
from forwarder.sink import RedisWriter
from forwarder.spool import DiskSpool, Route, entry_size
from forwarder.stats import SubscriptionStats, WriterStats
from forwarder.status import StatusReport
from forwarder.subscription import SubscriptionRules

log = logging.getLogger(__name__)
_state = operator.attrgetter("state")

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl+C in a terminal
    signal.SIGTERM,  # systemctl stop, docker stop, kill
)
RELOAD_SIGNAL = signal.SIGHUP  # systemctl reload (ExecReload=kill -HUP)
STATUS_INTERVAL = 2.0  # seconds between two STATUS= lines for systemd (if changed)
FREEZE_AFTER = 120.0  # seconds after a start or reload to freeze the GC even if not all connected


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
        # Before anything opens a file: enough descriptors for every socket, or exit 2.
        self.fd_limit = raise_fd_limit(fds_needed(len(subscriptions), config.io.handshake_threads))
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
        # Indexed like the spool's routes. Read by the writer, /metrics and /status on other
        # threads: replaced by a longer copy when routes are added, never grown in place.
        self.stats: list[SubscriptionStats] = [
            SubscriptionStats(
                r.source, r.event, r.stream, configured=i < len(routes) and not config.fleet.enabled
            )
            for i, r in enumerate(self.spool.routes)
        ]
        self.lastseen = LastSeen(config.spool.dir)
        self._resume: Marks = self.lastseen.load()  # the previous run's marks, used once
        self._lastseen_at = -SAVE_INTERVAL  # monotonic times of the last saved marks ...
        self._status_at = -STATUS_INTERVAL  # ... and of the last STATUS= line built
        self._status_sent = ""  # the last STATUS= line sent to systemd
        self._frozen = False  # gc.freeze() done since the last start or reload (_freeze)
        self._freeze_by = time.monotonic() + FREEZE_AFTER
        # Single Redis, Sentinel or Cluster; it connects on first use, in the writer thread.
        self.target = target if target is not None else make_target(config.redis)
        self.stop_event = threading.Event()
        self._signalled = False
        self._started_at = time.time()
        self._stopping = False
        self.engine = Engine(config.io, self.spool, connect)
        # What runs, by (source, event): replaced whole by _apply, read anywhere.
        self._running: dict[tuple[str, str], SubscriptionRules] = {}
        self.writer = RedisWriter(
            self.target,
            self.spool,
            _StatsView(self),
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
        # Fleet mode (fleet_glue.py): only what this member holds a lease for runs.
        self.fleet = (
            FleetGlue(
                config,
                self.registry,
                self.spool,
                self.engine,
                lambda: self._running,
                self._fleet_apply,
            )
            if config.fleet.enabled
            else None
        )
        self.checks = Checks(
            config,
            writer=self.writer,
            writer_stats=self.writer_stats,
            engine=self.engine,
            spool=self.spool,
            discovery=self.discovery,
            consumers=self.consumers,
            fleet=self.fleet,
            stats=lambda: self.stats,
            running=lambda: len(self._running),
            stopping=lambda: self._stopping,
        )
        self._status_report = StatusReport(
            lambda: self.stats,
            self.spool,
            self.writer_stats,
            self.problems,
            lambda: self.ready()[0],
            redact_url(config.redis.url),
            str(config.spool.dir),
            self._started_at,
            sections={"discovery": self.discovery.status}
            | ({"fleet": self.fleet.member.status} if self.fleet else {}),
            row_extra=self.fleet.role_of if self.fleet else None,
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

    @property
    def subscribers(self) -> tuple[SubscriptionRules, ...]:
        """The running subscriptions' rules, in the desired set's order (read-only outside)."""
        return tuple(self._running.values())

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
            watchdog_at = 0.0
            while not self._pause(1.0):
                if self.fleet is not None:
                    self.fleet.turn()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                self._watch()
                self._periodic(time.monotonic())
                now = time.monotonic()
                every = self._watchdog_every
                if (
                    every is not None
                    and now - watchdog_at >= every
                    and self.checks.progressing(now)
                ):
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
        if self.fleet is not None:
            self.fleet.wake()

    def _pause(self, timeout: float) -> bool:
        """The main loop's wait; in fleet mode directives end it early. True: stop."""
        if self.fleet is None:
            return self.stop_event.wait(timeout)
        self.fleet.wait(timeout)
        return self.stop_event.is_set()

    def _fleet_apply(self) -> None:
        with self._apply_lock:
            self._apply(self.config, "no longer a fleet candidate")

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True  # the main loop reloads within a second

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
        for name in ("redis", "metrics", "spool", "consumers", "io", "fleet"):
            if getattr(old, name) != getattr(new, name):
                log.warning("reload: [%s] changed; that takes effect after a restart", name)
        try:
            raise_fd_limit(fds_needed(len(new.subscriptions()), old.io.handshake_threads))
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            self.notifier.ready()
            return False
        logging.getLogger().setLevel(new.log_level)
        with self._apply_lock:
            self.discovery.reconfigure(new.discovery)
            kept, started, stopped = self._apply(new, "removed from the configuration by a reload")
            self.config = replace(
                new,
                redis=old.redis,
                metrics=old.metrics,
                spool=old.spool,
                consumers=old.consumers,
                io=old.io,
                fleet=old.fleet,
            )
        self._frozen = False  # the new subscriptions' state: freeze again once settled
        self._freeze_by = time.monotonic() + FREEZE_AFTER
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
        """Reconcile the running subscriptions with the desired set; under _apply_lock.

        Returns (kept, started, stopped). Unchanged ones keep their connections; removed and
        changed ones are stopped first, politely (close frames, their echoes,
        CLOSE_ECHO_TIMEOUT at most), so their upstream slots are free before a changed one
        reconnects; a subscription that leaves for good gets a last gap record with cause
        `removed`. `stats` and the running set are replaced, never changed in place.
        """
        result = desired(config, self.discovery.discovered())
        self.discovery.refused(result.refused)
        wanted = result.subscriptions
        running, ended = self._running, list[SubscriptionRules]()
        if self.fleet is not None:  # only ours; those stopped at their lease deadline end
            wanted = self.fleet.runnable(wanted)
            running, ended = self.fleet.split_finished(running)
        steps = plan({k: r.subscription for k, r in running.items()}, wanted)
        leaving = [running[k] for k in steps.stop] + ended
        # Out of the running set first: /healthz must not take one stopping on purpose for
        # a dead one.
        self._running = {k: running[k] for k in steps.keep}
        self.engine.stop(leaving, time.monotonic() + CLOSE_ECHO_TIMEOUT)
        stats = list(self.stats)
        for rules in leaving:
            stats[rules.index].configured = False
        now = time.time()
        for key in (k for k in steps.gone if k not in result.subscriptions):
            entry = removed_gap(running[key].index, now, why_removed)
            if not self.spool.append([entry], entry_size(entry)):
                log.warning("%s/%s: the spool refused its `removed` gap record", *key)
        added: list[tuple[tuple[str, str], int, Subscription]] = []
        for sub in steps.start:
            route = _route(sub)
            index = self.spool.add_route(route)
            while len(stats) <= index:  # stats are indexed like the spool's routes
                stats.append(SubscriptionStats(route.source, route.event, route.stream))
            stats[index].configured = True
            added.append((sub.key, index, sub))
        self.stats = stats  # published before any subscription can spool under a new index
        resume, self._resume = self._resume, {}
        started = {}
        for key, index, sub in added:
            resume_from, hooks = resume.get(key), dict[str, Any]()
            if self.fleet is not None:  # a takeover's gap, not the restart's; lease hooks
                resume_from, hooks = self.fleet.hooks(key, resume_from)
            backoff = ReconnectBackoff(sub.source.backoff, self._rand)
            started[key] = self.engine.add(index, sub, stats[index], backoff, resume_from, **hooks)
        kept = self._running
        # The desired set's order, kept ones where they were.
        self._running = {k: kept.get(k) or started[k] for k in wanted if k in kept or k in started}
        if steps.gone or started:
            log.info(
                "subscriptions: %d started, %d stopped, %d kept (%d sources)",
                len(started),
                len(leaving),
                len(steps.keep),
                len({r.subscription.source.name for r in self._running.values()}),
            )
        return len(steps.keep), len(started), len(leaving)

    def start(self) -> None:
        """Bind the HTTP port and start every thread; returns at once."""
        self.http.start()
        self.spool.start()
        self.writer.start()
        self.consumers.start()
        self.engine.start()
        if self.fleet is not None:
            self.fleet.start()
        with self._apply_lock:
            self._apply(self.config, "removed from the configuration")
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
        # 0a. Fleet mode: hand every subscription over (successors connect first, then ours
        #     close), at most half of shutdown_timeout; then leave the group.
        if self.fleet is not None:
            self.fleet.drain()
        # 0b. Consumer-group monitor: no new rounds, so the drain below has Redis to itself.
        self.consumers.stop()
        # 1. Subscriptions: no new connections; close frames on every connection, read until
        #    the server echoes them (CLOSE_ECHO_TIMEOUT), so frames in flight are still
        #    spooled; then cut what did not answer.
        self.engine.shutdown(deadline)
        # 2. Where each subscription stopped receiving, for the next start's restart gaps
        #    (every gap is closed by now).
        self.lastseen.save(self.stats, time.time())
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
        failed = self.checks.failed_threads()
        if pending:
            log.warning(
                "stopped with %d frames in the spool (%s): they are written after the next start",
                pending,
                self.config.spool.dir,
            )
        log.info("stopped")
        return ExitCode.FAILURE if failed else ExitCode.OK

    def _periodic(self, now: float) -> None:
        """Every few seconds, not every turn (each walks every subscription's stats): the
        marks for the next start's restart gaps, and systemd's STATUS= line if it changed."""
        if now - self._lastseen_at >= SAVE_INTERVAL:
            self._lastseen_at = now
            self.lastseen.save(self.stats, time.time())
        if now - self._status_at >= STATUS_INTERVAL:
            self._status_at = now
            _, info = self.ready()
            line = format_status(
                info["connected"], info["subscriptions"], self.spool.pending()[0], info["redis_ok"]
            )
            if line != self._status_sent:
                self._status_sent = line
                self.notifier.status(line)
            settled = info["connected"] >= info["subscriptions"] or now >= self._freeze_by
            if settled and not self._frozen:
                self._freeze()

    def _freeze(self) -> None:
        """Move every object alive now out of the cyclic garbage collector's sight.

        The subscriptions' long-lived state (rules, connections, stats, configuration: a
        few hundred thousand objects at 10,000 subscriptions) made every full collection a
        pause of 40-280 ms in the middle of traffic. Once they are all set up (connected, or
        FREEZE_AFTER seconds after a start or reload), one collection clears what is garbage
        now and `gc.freeze()` exempts the rest from later ones, which then only look at what
        was created since. Main thread only."""
        self._frozen = True
        started = time.monotonic()
        gc.collect()
        gc.freeze()
        log.debug(
            "garbage collector: %d objects frozen in %.0f ms",
            gc.get_freeze_count(),
            (time.monotonic() - started) * 1000,
        )

    def _watch(self) -> None:
        failed = self.checks.failed_threads()
        if failed:
            log.error("threads died (%s): stopping so that systemd restarts us", ", ".join(failed))
            self.stop_event.set()

    # -- health, readiness, status (called from HTTP threads) --------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """/healthz: every thread that should run is running (checks.py)."""
        return self.checks.health()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: Redis takes our writes, enough subscriptions are connected (checks.py)."""
        return self.checks.ready()

    def status(
        self, query: Mapping[str, Sequence[str]] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """/status: (HTTP status, document); see status.py for the query parameters."""
        return self._status_report.build(query)


def _route(sub: Subscription) -> Route:
    """Where the spool sends a subscription's entries."""
    return Route(sub.source.name, sub.event, sub.stream, sub.dead_letter_stream)


class _StatsView(Sequence[SubscriptionStats]):
    """The writer's view of `Forwarder.stats`: always the current list, however often a
    reload replaces it (the writer keeps this object, not a list)."""

    def __init__(self, owner: Forwarder) -> None:
        self._owner = owner

    @overload
    def __getitem__(self, index: int) -> SubscriptionStats: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[SubscriptionStats]: ...
    def __getitem__(self, index: int | slice) -> SubscriptionStats | Sequence[SubscriptionStats]:
        return self._owner.stats[index]

    def __len__(self) -> int:
        return len(self._owner.stats)

    def __iter__(self) -> Iterator[SubscriptionStats]:
        return iter(self._owner.stats)

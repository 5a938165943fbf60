"""The daemon: builds the threads from a Config, runs them, and shuts them down in order.

Threads and their owner (this object):
    io-N, handshake-N  the I/O loops and the handshake pool under every subscription
                       (engine.Engine; the subscriptions' rules are subscription.py)
    spool-fsync        fsyncs the spool (spool.DiskSpool)
    redis-writer       drains the spool into Redis (sink.RedisWriter)
    http               /metrics /healthz /readyz /status (http.HttpServer)
The main thread only waits on `stop_event`, applies reloads and watches the others.

Which subscriptions run is decided in one place, `_apply(wanted)`: start what is missing, stop
what is gone or changed, keep what is unchanged. Start-up and SIGHUP reload feed it today;
discovery polls and fleet leases can feed it the same way. Lists that other threads read
(`stats`, the running set) are replaced whole (copy-on-write), never changed in place.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any, overload

import redis

from forwarder import __version__
from forwarder.backoff import ReconnectBackoff
from forwarder.config import Config, Subscription, redact_url
from forwarder.engine import Engine
from forwarder.errors import ConfigError, ExitCode
from forwarder.handshake import Connector, websocket_connect
from forwarder.http import HttpServer
from forwarder.lastseen import SAVE_INTERVAL, LastSeen, Marks
from forwarder.limits import fds_needed, raise_fd_limit
from forwarder.link import CLOSE_ECHO_TIMEOUT
from forwarder.logs import redact
from forwarder.metrics import ForwarderCollector, build_registry
from forwarder.notify import Notifier, format_status
from forwarder.sink import IDLE_PING_SECONDS, RedisWriter, make_client
from forwarder.spool import DiskSpool, Route
from forwarder.stats import State, SubscriptionStats, WriterStats
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
        client: redis.Redis | None = None,
        connect: Connector = websocket_connect,
        rand: Callable[[], float] = random.random,
        notifier: Notifier | None = None,
        watchdog_every: float | None = None,
        reload: Callable[[], Config] | None = None,
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
            SubscriptionStats(r.source, r.event, r.stream, configured=i < len(routes))
            for i, r in enumerate(self.spool.routes)
        ]
        self.lastseen = LastSeen(config.spool.dir)
        self._resume: Marks = self.lastseen.load()  # the previous run's marks, used once
        self._lastseen_at = -SAVE_INTERVAL  # monotonic times of the last saved marks ...
        self._status_at = -STATUS_INTERVAL  # ... and of the last STATUS= line built
        self._status_sent = ""  # the last STATUS= line sent to systemd
        self._frozen = False  # gc.freeze() done since the last start or reload (_freeze)
        self._freeze_by = time.monotonic() + FREEZE_AFTER
        self.client = client if client is not None else make_client(config.redis)
        self.stop_event = threading.Event()
        self._signalled = False
        self._started_at = time.time()
        self._stopping = False
        self._writer_progress = -1  # last seen RedisWriter.progress, and when it changed
        self._writer_progress_at = time.monotonic()
        self.engine = Engine(config.io, self.spool, connect)
        # What runs, by (source, event): replaced whole by _apply (main thread), read anywhere.
        self._running: dict[tuple[str, str], SubscriptionRules] = {}
        self._initial = {sub.key: sub for sub in subscriptions}
        self.writer = RedisWriter(
            self.client, self.spool, _StatsView(self), self.writer_stats, config.redis, rand
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

    @property
    def subscribers(self) -> tuple[SubscriptionRules, ...]:
        """The running subscriptions' rules, in configuration order (read-only outside)."""
        return tuple(self._running.values())

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> ExitCode:
        """Start, wait for SIGTERM/SIGINT, shut down. Main thread only."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        previous[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, self._on_reload_signal)
        try:
            self.start()
            # Ready once configuration, spool and metrics are up: not gated on the upstream,
            # or an upstream outage would become a start-up timeout and a restart loop.
            self.notifier.ready()
            watchdog_at = 0.0
            while not self.stop_event.wait(1.0):
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                self._watch()
                self._periodic(time.monotonic())
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
        for name in ("redis", "metrics", "spool", "io"):
            if getattr(old, name) != getattr(new, name):
                log.warning("reload: [%s] changed; that takes effect after a restart", name)
        logging.getLogger().setLevel(new.log_level)
        wanted = {sub.key: sub for sub in new.subscriptions()}
        try:
            raise_fd_limit(fds_needed(len(wanted), old.io.handshake_threads))
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            self.notifier.ready()
            return False
        kept, started, stopped = self._apply(wanted)
        self._frozen = False  # the new subscriptions' state: freeze again once settled
        self._freeze_by = time.monotonic() + FREEZE_AFTER
        self.config = replace(new, redis=old.redis, metrics=old.metrics, spool=old.spool, io=old.io)
        log.info(
            "reloaded %s: %d subscriptions kept, %d started, %d stopped",
            new.path or "the configuration",
            kept,
            started,
            stopped,
        )
        self.notifier.ready()
        return True

    def _apply(self, wanted: dict[tuple[str, str], Subscription]) -> tuple[int, int, int]:
        """Make the running subscriptions those of `wanted`; return (kept, started, stopped).

        Unchanged ones keep their connections; removed and changed ones are stopped first,
        politely (close frames, their echoes, CLOSE_ECHO_TIMEOUT at most), so their upstream
        slots are free before a changed one reconnects. Main thread only.
        """
        running = self._running
        kept = {k: r for k, r in running.items() if _same(wanted.get(k), r.subscription)}
        leaving = [r for k, r in running.items() if k not in kept]
        self.engine.stop(leaving, time.monotonic() + CLOSE_ECHO_TIMEOUT)
        stats = list(self.stats)
        for rules in leaving:
            stats[rules.index].configured = False
        added: list[tuple[tuple[str, str], int, Subscription]] = []
        for key, sub in wanted.items():
            if key in kept:
                continue
            route = _route(sub)
            index = self.spool.add_route(route)
            while len(stats) <= index:  # stats are indexed like the spool's routes
                stats.append(SubscriptionStats(route.source, route.event, route.stream))
            stats[index].configured = True
            added.append((key, index, sub))
        self.stats = stats  # published before any subscription can spool under a new index
        resume, self._resume = self._resume, {}
        started = {
            key: self.engine.add(
                index,
                sub,
                stats[index],
                ReconnectBackoff(sub.source.backoff, self._rand),
                resume.get(key),
            )
            for key, index, sub in added
        }
        # Configuration order, kept ones where they were.
        self._running = {k: kept.get(k) or started[k] for k in wanted}
        return len(kept), len(started), len(leaving)

    def start(self) -> None:
        """Bind the HTTP port and start every thread; returns at once."""
        self.http.start()
        self.spool.start()
        self.writer.start()
        self.engine.start()
        self._apply(self._initial)
        log.info(
            "forwarder %s started: %d subscriptions from %d sources to %s; metrics on http://%s:%d",
            __version__,
            len(self._running),
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

    def _progressing(self, now: float) -> bool:
        """Evidence for WATCHDOG=1: no thread died, the loops run, the writer loop turns."""
        if self._failed_threads() or not self.writer.is_alive():
            return False
        if self.engine.dead():
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
        failed = self.engine.failures()  # crashed subscriptions, loops and workers
        if self.writer.failed is not None:
            failed.append("redis-writer")
        return failed

    # -- health, readiness, status (called from HTTP threads) --------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every thread that should run is running."""
        dead = self._failed_threads()
        if not self._stopping:
            dead += self.engine.dead()
            if not self.writer.is_alive():
                dead.append("redis-writer")
        return not dead, {"healthy": not dead, "dead_threads": sorted(set(dead))}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when Redis takes our writes and enough subscriptions are connected.

        Policy: Redis answered the writer within REDIS_READY_AGE seconds and is not refusing
        writes for a configuration error (NOPERM, WRONGTYPE), at least
        `metrics.ready_min_connected` (a fraction, default 1.0 = all) of the subscriptions
        are connected, and the daemon is not shutting down.
        """
        last_ok = self.writer_stats.last_ok_at
        redis_ok = (
            last_ok is not None
            and time.monotonic() - last_ok <= REDIS_READY_AGE
            and self.writer_stats.config_error is None
        )
        # In C (attrgetter, list.count): called every STATUS_INTERVAL over 10,000 stats.
        connected = list(map(_state, self.stats)).count(State.CONNECTED)
        total = len(self._running)
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
        stats = self.stats  # one snapshot: the spool's routes are never fewer than these
        pending, nbytes = self.spool.pending()
        pending_by_route = list(self.spool.pending_by_route)
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
            "subscriptions": [
                {
                    **self._subscription_status(s, now),
                    "spool_pending": pending_by_route[i] if i < len(pending_by_route) else 0,
                }
                for i, s in enumerate(stats)
            ],
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
            "resubscribes": dict(s.resubscribes),
            "displacements": s.displacements,
            "flapping": s.flapping_until is not None and s.flapping_until > now,
            "disconnected_seconds": round(s.blind_seconds(now), 3),
            "token_expires_at": s.token_expires_at,
            "gaps_recorded": s.gaps_recorded,
        }


def _same(new: Subscription | None, old: Subscription) -> bool:
    """Whether a reload leaves this subscription's connection as it is.

    The source's `events` list is not part of it: adding an event to a source must not
    reconnect the source's other events.
    """
    if new is None:
        return False
    return replace(new, source=replace(new.source, events=())) == replace(
        old, source=replace(old.source, events=())
    )


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

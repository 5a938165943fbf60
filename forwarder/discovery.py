"""Instance discovery: poll each `[[discovery]]` server's listing and keep a trusted set.

The upstream announces nothing when an instance is created or deleted (docs/discovery.md),
so discovery polls `GET /instance/fetchInstances` every `poll_interval` and diffs by name.

`DiscoveryRules` holds the rules, one object per table, sans-I/O (fed with listings and
failures plus the time, it answers what changed; tests drive it with a fake clock):
  * a listed instance is added at once;
  * an instance is removed only after it is missing from ABSENCES_BEFORE_REMOVAL (2)
    consecutive listings that were believed;
  * a listing in which more than half of the current instances vanished (an empty list after
    a non-empty one included) is suspicious: it is not believed for removals and a WARNING
    says so; if the next listing shows the drop again it is believed from then on (so such
    a mass removal takes one poll longer than a single one);
  * a changed Auth.token replaces the instance's token in place (its `TokenCell`): the next
    connection attempt uses it, a healthy connection is not touched;
  * a failed poll (timeout, connection, TLS, 401/403, 5xx, other status, invalid JSON, an
    unreadable key) changes nothing: the current set stays as it is.

`DiscoveryPoller` is the I/O: one thread (owned by the daemon) that polls every table when
due, applies the rules, updates the token cells and calls `on_change` when the set of
instances changed. `DiscoveryCollector` exports the forwarder_discovery_* metrics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forwarder.config import Secret, TokenCell, redact_url
from forwarder.discovery_config import DiscoveryConfig
from forwarder.errors import ConfigError, DiscoveryError
from forwarder.listing import ERROR_KINDS, Instance, Listing, fetch_listing, parse_listing

log = logging.getLogger(__name__)

ABSENCES_BEFORE_REMOVAL = 2
LOG_EVERY = 300.0  # seconds: a repeated WARNING/ERROR of one table and kind, at most this often

Fetcher = Callable[[DiscoveryConfig, Secret], bytes]


@dataclass
class PollResult:
    """What one poll changed (all empty after a failed poll)."""

    added: list[Instance] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rotated: list[Instance] = field(default_factory=list)  # the token changed
    suspicious: str | None = None  # why the listing was (or is no longer) doubted
    believed: bool = True  # False: a suspicious listing, not used for removals

    @property
    def membership_changed(self) -> bool:
        return bool(self.added or self.removed)


class DiscoveryRules:
    """The trusted instance set of one table. Not thread-safe: the poller thread owns it."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        self.instances: dict[str, Instance] = {}  # the current, trusted set
        self.absent: dict[str, int] = {}  # consecutive believed listings without the name
        self.invalid: dict[str | None, str] = {}  # unusable elements of the last listing
        self.suspicious_streak = 0  # consecutive listings with a suspicious drop
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.polls = 0
        self.last_success: float | None = None  # unix time of the last believed listing
        self.last_error: str | None = None
        self.last_error_kind: str | None = None

    def failed(self, kind: str, message: str) -> None:
        """A poll failed: count it; the current set stays exactly as it is."""
        self.polls += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = message
        self.last_error_kind = kind

    def listed(self, listing: Listing, now: float) -> PollResult:
        """Apply one listing (unix time `now`); returns what changed."""
        self.polls += 1
        wants = self.config.wants
        valid = {n: i for n, i in listing.instances.items() if wants(n)}
        self.invalid = {n: r for n, r in listing.invalid.items() if n is None or wants(n)}
        if self.invalid:
            self.errors["invalid_instance"] += len(self.invalid)
        # A named element we cannot use still shows the instance exists: not absent.
        present = set(valid) | {n for n in self.invalid if n is not None}
        missing = [n for n in self.instances if n not in present]
        result = PollResult()
        if self.instances and 2 * len(missing) > len(self.instances):
            self.suspicious_streak += 1
            result.suspicious = (
                f"{len(missing)} of {len(self.instances)} instances vanished from one listing"
            )
            result.believed = self.suspicious_streak >= 2
        else:
            self.suspicious_streak = 0
        if not result.believed:
            self.errors["suspicious_drop"] += 1
            self.last_error_kind = "suspicious_drop"
            self.last_error = f"{result.suspicious}: kept, not believed until it repeats"
        else:
            self.last_success = now
            for name in missing:
                count = self.absent.get(name, 0) + 1
                if count >= ABSENCES_BEFORE_REMOVAL:
                    self.absent.pop(name, None)
                    del self.instances[name]
                    result.removed.append(name)
                else:
                    self.absent[name] = count
        for name in present:
            self.absent.pop(name, None)
        for name, instance in valid.items():
            old = self.instances.get(name)
            if old is None:
                result.added.append(instance)
            elif old.token != instance.token:
                result.rotated.append(instance)
            self.instances[name] = instance
        return result

    def reconfigure(self, config: DiscoveryConfig) -> list[str]:
        """New settings for this table (a reload); returns the instances the new include /
        exclude globs drop, which leave at once: the operator said so."""
        self.config = config
        dropped = [n for n in self.instances if not config.wants(n)]
        for name in dropped:
            del self.instances[name]
            self.absent.pop(name, None)
        return dropped


@dataclass(frozen=True)
class Discovered:
    """One discovered instance as the desired set needs it: table, name, live token."""

    table: DiscoveryConfig
    name: str
    cell: TokenCell


class _Throttle:
    """At most one log line per key every LOG_EVERY seconds, counting what it held back."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def allow(self, key: tuple[str, str]) -> tuple[bool, int]:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < LOG_EVERY:
            self._held[key] = self._held.get(key, 0) + 1
            return False, 0
        self._last[key] = now
        return True, self._held.pop(key, 0)

    def reset(self, table: str) -> None:
        for key in [k for k in self._last if k[0] == table]:
            del self._last[key]


class DiscoveryPoller:
    """Owns the discovery thread. `start()` returns at once; `stop()` then `join()`.

    Thread-safety: `discovered`, `status`, `snapshot_metrics`, `refused`, `reconfigure`,
    `start`, `stop` and `join` may be called from any thread (a lock guards the shared
    state); the rules and the fetching run on the poller thread. `on_change` is called on the
    poller thread, after the cells are updated, whenever instances were added or removed.
    """

    def __init__(
        self,
        tables: Sequence[DiscoveryConfig],
        on_change: Callable[[], None],
        fetch: Fetcher = fetch_listing,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._on_change = on_change
        self._fetch = fetch
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._rules: dict[str, DiscoveryRules] = {t.name: DiscoveryRules(t) for t in tables}
        self._cells: dict[tuple[str, str], TokenCell] = {}
        self._due: dict[str, float] = dict.fromkeys(self._rules, -math.inf)
        self._refused: dict[str, dict[str, str]] = {t.name: {} for t in tables}
        self._throttle = _Throttle(clock)
        self._stop = threading.Event()
        self._wake = threading.Event()  # reconfigure(): look at the schedule again
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self.failed: BaseException | None = None  # set if the thread died of a bug
        # Polls finished, reconciliation included (written by whichever thread polled).
        self.completed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to exit; a request in flight finishes (request_timeout bounds it)."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- read by other threads ---------------------------------------------------------------

    def discovered(self) -> list[Discovered]:
        """Every current instance of every table, in table then listing order."""
        with self._lock:
            return [
                Discovered(rules.config, name, self._cells[(table, name)])
                for table, rules in self._rules.items()
                for name in rules.instances
            ]

    def instances(self, table: str) -> list[Instance]:
        """The current instances of one table, in listing order."""
        with self._lock:
            rules = self._rules.get(table)
            return list(rules.instances.values()) if rules is not None else []

    def never_listed(self) -> list[str]:
        """Tables that have not had one believed listing yet (for /readyz)."""
        with self._lock:
            return [t for t, r in self._rules.items() if r.last_success is None]

    def refused(self, refusals: Iterable[tuple[str, str, str]]) -> None:
        """The desired set could not take these (table, instance, reason): record and log."""
        with self._lock:
            by_table: dict[str, dict[str, str]] = {t: {} for t in self._rules}
            for table, name, reason in refusals:
                if table in by_table:
                    by_table[table][name] = reason
            for table, names in by_table.items():
                new = {n: r for n, r in names.items() if n not in self._refused.get(table, {})}
                self._refused[table] = names
                rules = self._rules.get(table)
                if rules is not None and new:
                    rules.errors["refused"] += len(new)
                for name, reason in new.items():
                    log.error(
                        "discovery %s: instance %s is not subscribed: %s", table, name, reason
                    )

    def reconfigure(self, tables: Sequence[DiscoveryConfig]) -> bool:
        """Apply reloaded [[discovery]] tables; True if instances left (the caller reconciles).

        A table whose name stays keeps its instances and tokens; a new one is polled at once;
        a removed one's instances leave.
        """
        changed = False
        with self._lock:
            wanted = {t.name: t for t in tables}
            for name in [n for n in self._rules if n not in wanted]:
                changed = changed or bool(self._rules[name].instances)
                del self._rules[name]
                self._due.pop(name, None)
                self._refused.pop(name, None)
                for key in [k for k in self._cells if k[0] == name]:
                    del self._cells[key]
            for name, table in wanted.items():
                rules = self._rules.get(name)
                if rules is None:
                    self._rules[name] = DiscoveryRules(table)
                    self._due[name] = -math.inf
                    self._refused[name] = {}
                    continue
                if rules.config.api_url != table.api_url or rules.config.api_key != table.api_key:
                    self._due[name] = -math.inf  # another server or key: look now
                for instance in rules.reconfigure(table):
                    self._cells.pop((name, instance), None)
                    changed = True
        self._wake.set()
        return changed

    def status(self) -> list[dict[str, Any]]:
        """The /status section: per table, its health and what it is waiting for."""
        now = self._wall()
        with self._lock:
            return [
                {
                    "name": table,
                    "api_url": redact_url(rules.config.api_url),
                    "poll_interval": rules.config.poll_interval,
                    "instances": len(rules.instances),
                    "polls": rules.polls,
                    "last_success_age_seconds": None
                    if rules.last_success is None
                    else round(max(0.0, now - rules.last_success), 3),
                    "last_error_kind": rules.last_error_kind,
                    "last_error": rules.last_error,
                    "errors": {k: v for k, v in rules.errors.items() if v},
                    "suspicious_drop": rules.suspicious_streak > 0,
                    "pending_removal": dict(rules.absent),
                    "invalid": {str(k): v for k, v in rules.invalid.items()},
                    "refused": dict(self._refused.get(table, {})),
                }
                for table, rules in self._rules.items()
            ]

    def snapshot_metrics(self) -> list[tuple[str, dict[str, int], int, float | None, int]]:
        """(table, errors by kind, instances, last success unix time, polls) per table."""
        with self._lock:
            return [
                (t, dict(r.errors), len(r.instances), r.last_success, r.polls)
                for t, r in self._rules.items()
            ]

    # -- poller thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                now = self._clock()
                with self._lock:
                    due = [t for t, at in self._due.items() if at <= now]
                for table in due:
                    if self._stop.is_set():
                        return
                    self.poll(table)
                with self._lock:
                    nearest = min(self._due.values(), default=math.inf)
                wait = nearest - self._clock()
                if wait > 0:
                    self._wake.wait(None if math.isinf(wait) else wait)
        except BaseException as exc:  # a bug: report it through /healthz and the logs
            self.failed = exc
            log.exception("the discovery thread crashed")

    def poll(self, table: str) -> PollResult:
        """Poll one table now (poller thread, or a test driving it without the thread).

        Blocks for the request (up to request_timeout) and, when instances were added or
        removed, for `on_change` (the reconciliation).
        """
        try:
            return self._poll(table)
        finally:
            with self._lock:
                self.completed += 1

    def _poll(self, table: str) -> PollResult:
        with self._lock:
            rules = self._rules.get(table)
            if rules is None:
                return PollResult()
            config = rules.config
            self._due[table] = self._clock() + config.poll_interval
        try:
            body = self._fetch(config, config.api_key.read())
            listing = parse_listing(body)
        except ConfigError as exc:  # the key file or credential is unreadable
            self._failed(table, rules, "key", str(exc))
            return PollResult()
        except DiscoveryError as exc:
            self._failed(table, rules, exc.kind, str(exc))
            return PollResult()
        with self._lock:
            if self._rules.get(table) is not rules:  # reconfigured meanwhile: next round
                return PollResult()
            had_error = rules.last_error_kind is not None
            result = rules.listed(listing, self._wall())
            recovered = had_error and result.believed
            for instance in result.added:
                self._cells[(table, instance.name)] = TokenCell(instance.token)
            for instance in result.rotated:
                self._cells[(table, instance.name)].set(instance.token)
            for name in result.removed:
                self._cells.pop((table, name), None)
            if result.believed:
                rules.last_error_kind = rules.last_error = None
        self._report(table, rules, result, recovered, listing)
        if result.membership_changed:
            self._on_change()
        return result

    def _failed(self, table: str, rules: DiscoveryRules, kind: str, message: str) -> None:
        with self._lock:
            rules.failed(kind, message)
            kept = len(rules.instances)
        allowed, held = self._throttle.allow((table, kind))
        if not allowed:
            return
        more = f" ({held} more since the last report)" if held else ""
        # A wrong key or an unreadable one needs a human; the rest usually passes by itself.
        level = logging.ERROR if kind in ("unauthorized", "key", "tls") else logging.WARNING
        log.log(
            level,
            "discovery %s: listing failed (%s): %s; keeping the %d instances subscribed, "
            "retrying in %.0fs%s",
            table,
            kind,
            message,
            kept,
            rules.config.poll_interval,
            more,
        )

    def _report(
        self,
        table: str,
        rules: DiscoveryRules,
        result: PollResult,
        recovered: bool,
        listing: Listing,
    ) -> None:
        if recovered:
            self._throttle.reset(table)
            log.info("discovery %s: listing works again", table)
        if result.suspicious is not None:
            allowed, _ = self._throttle.allow((table, "suspicious_drop"))
            if not result.believed and allowed:
                log.warning(
                    "discovery %s: %s: keeping them subscribed; if the next listing shows the "
                    "same, it is believed",
                    table,
                    result.suspicious,
                )
            elif result.believed:
                log.warning("discovery %s: %s again: believed", table, result.suspicious)
        if result.added or result.removed:
            parts = []
            if result.added:
                names = _names([i.name for i in result.added])
                parts.append(f"subscribing to {len(result.added)} new ({names})")
            if result.removed:
                parts.append(
                    f"stopping {len(result.removed)} missing from {ABSENCES_BEFORE_REMOVAL} "
                    f"consecutive listings ({_names(result.removed)})"
                )
            log.info(
                "discovery %s: %d instances; %s", table, len(rules.instances), ", ".join(parts)
            )
        if result.rotated:
            log.info(
                "discovery %s: new token for %d instances (%s): used at their next connection",
                table,
                len(result.rotated),
                _names([i.name for i in result.rotated]),
            )
        bad = {n: r for n, r in listing.invalid.items() if n is None or rules.config.wants(n)}
        if bad:
            allowed, _ = self._throttle.allow((table, "invalid_instance"))
            if allowed:
                first = next(iter(bad.items()))
                log.warning(
                    "discovery %s: %d listed elements are not usable, e.g. %s: %s (existing "
                    "subscriptions keep their last good token)",
                    table,
                    len(bad),
                    first[0] or "(no name)",
                    first[1],
                )


def _names(names: list[str], limit: int = 10) -> str:
    if len(names) <= limit:
        return ", ".join(names) or "-"
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


class DiscoveryCollector(Collector):
    """forwarder_discovery_* families, read from the poller at scrape time."""

    def __init__(self, poller: DiscoveryPoller) -> None:
        self._poller = poller

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "forwarder_discovery_errors",
            "Failed or doubted instance listings, by kind (see README, Discovery).",
            labels=("discovery", "kind"),
        )
        sources = GaugeMetricFamily(
            "forwarder_discovered_sources",
            "Instances discovery currently subscribes to.",
            labels=("discovery",),
        )
        success = GaugeMetricFamily(
            "forwarder_discovery_last_success_timestamp_seconds",
            "Unix time of the last listing discovery believed (0: none yet).",
            labels=("discovery",),
        )
        polls = CounterMetricFamily(
            "forwarder_discovery_polls",
            "Listing requests made, successful or not.",
            labels=("discovery",),
        )
        for table, by_kind, count, last, made in self._poller.snapshot_metrics():
            for kind, value in by_kind.items():
                errors.add_metric((table, kind), value)
            sources.add_metric((table,), count)
            success.add_metric((table,), last or 0.0)
            polls.add_metric((table,), made)
        yield errors
        yield sources
        yield success
        yield polls

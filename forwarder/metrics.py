"""Every Prometheus metric forwarder exports, in one place.

The values live in `stats` objects written lock-free by their owning threads; this collector
turns them into metric families at scrape time, so a scrape costs the same whatever the
traffic, and the I/O loops never wait for it.

Two levels of detail (`[metrics] detail`):

- "event" (the default) aggregates at scrape time: counters and gauges per event (and per
  source when `source_label` says so), the latency histogram per event only, subscriptions
  counted per source and state, and one series per *problem* of the subscriptions that have
  one (see problems.py), at most PROBLEM_SERIES_MAX. At 770 sources x 13 events that is
  about 5,000 series instead of 340,000.
- "subscription" keeps every series per (source, event), as before 0.2: about 40 series per
  subscription, for deployments of a few hundred subscriptions at most.

Both levels use the same metric names; the finer one only adds labels, so a query that sums
by `event` works in both. Series exist from the start (value 0): alerts see zero, not absence.
"""

from __future__ import annotations

import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from forwarder import __version__
from forwarder.problems import PROBLEMS, ProblemFinder
from forwarder.spool import DiskSpool
from forwarder.stats import LATENCY_BUCKETS, State, SubscriptionStats, WriterStats

LABELS = ("source", "event")
# source_label = "auto": label by source when there are at most this many sources at start.
# 20 sources x 13 events x ~15 series = 3,900 series; beyond that the source label costs
# more than it tells (the problem series still name the source of whatever is wrong).
AUTO_SOURCE_LABEL_MAX = 20
# At most this many forwarder_subscription_problem series: a mass outage of 10,000
# subscriptions must not become 10,000 new series (forwarder_subscription_problems counts
# them all; /status?state=down lists them all).
PROBLEM_SERIES_MAX = 1000

# Plain counters of SubscriptionStats: (metric name, help, attribute).
_COUNTERS = (
    (
        "forwarder_messages_received",
        "WebSocket data frames received, before any validation.",
        "received",
    ),
    (
        "forwarder_messages_forwarded",
        "Frames whose XADD Redis confirmed (dead-lettered frames are not counted).",
        "forwarded",
    ),
    (
        "forwarder_reconnects",
        "Connection attempts made after a connection was lost or an attempt failed.",
        "reconnects",
    ),
    (
        "forwarder_gap_records",
        "Gap records (intervals without receiving) written to the gap stream.",
        "gaps_recorded",
    ),
    (
        "forwarder_messages_dropped",
        "Frames the spool refused (see forwarder_spool_dropped_total for why).",
        "dropped",
    ),
    (
        "forwarder_displacements",
        "Re-subscribes after which traffic resumed at once: another client had the feed.",
        "displacements",
    ),
)
# Counters kept as {label value: count}: (metric name, help, attribute, label).
_LABELLED = (
    (
        "forwarder_close_codes",
        "Connections ended, by close code (4xxx for application codes, 1006 when dropped).",
        "close_codes",
        "code",
    ),
    (
        "forwarder_handshake_failures",
        "Failed upgrade attempts by HTTP status ('error' when no status was received).",
        "handshake_failures",
        "status",
    ),
    (
        "forwarder_invalid_messages",
        "Frames that were not a JSON object or array, sent to the dead-letter stream.",
        "invalid",
        "reason",
    ),
    (
        "forwarder_resubscribes",
        "Make-before-break re-subscribes, by trigger (silence watchdog or periodic).",
        "resubscribes",
        "reason",
    ),
)
_READ_COUNTERS = operator.attrgetter(*(attr for _, _, attr in _COUNTERS))
_READ_LABELLED = operator.attrgetter(*(attr for _, _, attr, _ in _LABELLED))
_FLAPPING_UNTIL = operator.attrgetter("flapping_until")
_LAST_MESSAGE_AT = operator.attrgetter("last_message_at")
_SOURCE_EXPIRY = operator.attrgetter("source", "token_expires_at")
_SOURCE_STATE = operator.attrgetter("source", "state")
_CONFIGURED = operator.attrgetter("configured")
# Slots of a group's sums after the plain counters.
_BLIND, _PENDING, _FLAPPING, _LAST = range(len(_COUNTERS), len(_COUNTERS) + 4)
_BUCKET_BOUNDS = tuple(
    "+Inf" if b == float("inf") else repr(b) for b in (*LATENCY_BUCKETS, float("inf"))
)


def source_labelled(setting: str, sources: int) -> bool:
    """Whether detail "event" labels by source: `[metrics] source_label` for `sources`."""
    if setting == "auto":
        return sources <= AUTO_SOURCE_LABEL_MAX
    return setting == "always"


class _Group:
    """Sums of the subscriptions that share one label set."""

    __slots__ = ("connected", "labelled", "sums")

    def __init__(self) -> None:
        self.sums = [0.0] * (_LAST + 1)
        self.labelled: tuple[dict[str, int], ...] = tuple({} for _ in _LABELLED)
        self.connected: float | None = None  # None: no configured subscription in it


class _Latency:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0


class ForwarderCollector(Collector):
    """Reads the shared stats on each scrape. Thread-safe (reads only, no lock held).

    Reading is safe without stopping the writers: every field of SubscriptionStats and
    WriterStats is written by one thread, and in CPython a read of an int, float or
    reference is atomic; dicts are copied before iterating, and the list of subscriptions
    is copied once per scrape (a reload may append to it meanwhile). A scrape may see one
    counter a few increments ahead of another; each one on its own never goes back.
    """

    def __init__(
        self,
        subscriptions: Callable[[], Sequence[SubscriptionStats]],
        writer: WriterStats,
        spool: DiskSpool,
        problems: ProblemFinder,
        detail: str = "event",
        by_source: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._subscriptions = subscriptions
        self._writer = writer
        self._spool = spool
        self._problems = problems
        self._per_subscription = detail == "subscription"
        self._labels: tuple[str, ...] = (
            LABELS if by_source or self._per_subscription else ("event",)
        )
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        subs = tuple(self._subscriptions())
        pending = list(self._spool.pending_by_route)
        now = self._clock()
        yield from self._traffic(subs, pending, now)
        yield from self._health(subs, now)
        yield from self._process_wide()

    # -- per label set ------------------------------------------------------------------------

    def _traffic(
        self, subs: Sequence[SubscriptionStats], pending: list[int], now: float
    ) -> Iterator[Metric]:
        # Group first, then sum each group column by column: zip() and sum() run in C,
        # which keeps a scrape of 10,000 subscriptions far below a second.
        by_source = len(self._labels) == 2
        members: dict[tuple[str, ...], list[int]] = {}
        key: tuple[str, ...]
        for index, s in enumerate(subs):
            key = (s.source, s.event) if by_source else (s.event,)
            found = members.get(key)
            if found is None:
                members[key] = [index]
            else:
                found.append(index)
        groups: dict[tuple[str, ...], _Group] = {}
        for key, indices in members.items():
            group = groups[key] = _Group()
            mine = [subs[i] for i in indices]
            sums = group.sums
            sums[: len(_COUNTERS)] = map(sum, zip(*map(_READ_COUNTERS, mine), strict=True))
            columns = zip(*map(_READ_LABELLED, mine), strict=True)
            for into, dicts in zip(group.labelled, columns, strict=True):
                for counts in dicts:
                    for value, count in list(counts.items()):
                        into[value] = into.get(value, 0) + count
            sums[_BLIND] = sum(s.blind_seconds(now) for s in mine)
            sums[_PENDING] = sum(pending[i] for i in indices if i < len(pending))
            # filter(None, ...) drops the Nones (and zeros, harmless here), in C.
            sums[_FLAPPING] = sum(map(now.__lt__, filter(None, map(_FLAPPING_UNTIL, mine))))
            sums[_LAST] = max(filter(None, map(_LAST_MESSAGE_AT, mine)), default=0.0)
            if self._per_subscription:
                ups = [s.state is State.CONNECTED for s in mine if s.configured]
                group.connected = (1.0 if any(ups) else 0.0) if ups else None
        # The histogram per event only, unless every series is per subscription.
        latency: dict[tuple[str, ...], _Latency] = {}
        if self._per_subscription:
            by_histogram = members
        else:
            by_histogram = {}
            for index, s in enumerate(subs):
                by_histogram.setdefault((s.event,), []).append(index)
        for key, indices in by_histogram.items():
            hist = latency[key] = _Latency()
            histograms = [subs[i].latency for i in indices]
            # The writer updates counts in place (its length never changes): a bucket read
            # a moment late is still a value it had, and buckets only grow.
            columns = zip(*(h.counts for h in histograms), strict=True)
            hist.counts = [sum(col) for col in columns]
            hist.sum = sum(h.sum for h in histograms)

        labels = self._labels
        for slot, (name, doc, _) in enumerate(_COUNTERS):
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, group in groups.items():
                family.add_metric(key, group.sums[slot])
            yield family
        for slot, (name, doc, _, label) in enumerate(_LABELLED):
            family = CounterMetricFamily(name, doc, labels=(*labels, label))
            for key, group in groups.items():
                for value, count in group.labelled[slot].items():
                    family.add_metric((*key, value), count)
            yield family
        blind = CounterMetricFamily(
            "forwarder_disconnected_seconds",
            "Seconds the subscriptions were not receiving: disconnected, or displaced.",
            labels=labels,
        )
        last = GaugeMetricFamily(
            "forwarder_last_message_timestamp_seconds",
            "Unix time of the last data frame received (0 if none yet).",
            labels=labels,
        )
        flapping = GaugeMetricFamily(
            "forwarder_flapping",
            "Subscriptions whose watchdog stands down: another client keeps taking the feed.",
            labels=labels,
        )
        spooled = GaugeMetricFamily(
            "forwarder_spool_pending_messages",
            "Frames (and gap records) spooled and not yet confirmed by Redis.",
            labels=labels,
        )
        for key, group in groups.items():
            sums = group.sums
            blind.add_metric(key, sums[_BLIND])
            last.add_metric(key, sums[_LAST])
            flapping.add_metric(key, sums[_FLAPPING])
            spooled.add_metric(key, sums[_PENDING])
        yield blind
        yield last
        yield flapping
        yield spooled
        hist_labels = labels if self._per_subscription else ("event",)
        histogram = HistogramMetricFamily(
            "forwarder_forward_latency_seconds",
            "Time from receiving a frame to Redis confirming its XADD.",
            labels=hist_labels,
        )
        for key, hist in latency.items():
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(_BUCKET_BOUNDS, hist.counts, strict=True):
                running += count
                buckets.append((bound, running))
            histogram.add_metric(key, buckets, hist.sum)
        yield histogram
        if self._per_subscription:
            up_family = GaugeMetricFamily(
                "forwarder_connected", "1 while the subscription is connected.", labels=labels
            )
            for key, group in groups.items():
                if group.connected is not None:  # a spool-only leftover has no connection
                    up_family.add_metric(key, group.connected)
            yield up_family

    # -- subscription health ------------------------------------------------------------------

    def _health(self, subs: Sequence[SubscriptionStats], now: float) -> Iterator[Metric]:
        expiry: dict[str, float] = {}
        for source, exp in map(_SOURCE_EXPIRY, subs):
            if exp is not None:
                # Subscriptions re-read the token at different times: the newest token (the
                # latest exp) is the one the next reconnect will use.
                expiry[source] = max(exp, expiry.get(source, exp))
        # Counter() of an iterable counts in C.
        counts = Counter(map(_SOURCE_STATE, filter(_CONFIGURED, subs)))
        family = GaugeMetricFamily(
            "forwarder_subscriptions",
            "Configured subscriptions by source and state.",
            labels=("source", "state"),
        )
        states = tuple(State)
        for source in dict.fromkeys(source for source, _ in counts):  # first-seen order
            for state in states:
                family.add_metric((source, state.value), counts[source, state])
        yield family

        found = self._problems.find(subs, now)
        totals = dict.fromkeys(PROBLEMS, 0)
        problem = GaugeMetricFamily(
            "forwarder_subscription_problem",
            "1 for each problem of an unhealthy subscription (down, auth, stalled, "
            f"reconnecting, displaced, token_expiring); at most {PROBLEM_SERIES_MAX} series.",
            labels=("source", "event", "problem"),
        )
        room = PROBLEM_SERIES_MAX
        for s, names in zip(subs, found, strict=True):
            for name in names:
                totals[name] += 1
                if room > 0:
                    problem.add_metric((s.source, s.event, name), 1.0)
                    room -= 1
        yield problem
        counts_family = GaugeMetricFamily(
            "forwarder_subscription_problems",
            "Subscriptions that have each problem (all of them, unlike the series above).",
            labels=("problem",),
        )
        for name, count in totals.items():
            counts_family.add_metric((name,), count)
        yield counts_family

        token = GaugeMetricFamily(
            "forwarder_token_expiry_timestamp_seconds",
            "The token's exp claim (read without verifying it); absent when it has none.",
            labels=("source",),
        )
        for source, exp in expiry.items():
            token.add_metric((source,), exp)
        yield token

    # -- process-wide -------------------------------------------------------------------------

    def _process_wide(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "forwarder_redis_errors", "Failed Redis calls by error class.", labels=("kind",)
        )
        for kind, count in list(self._writer.errors.items()):
            errors.add_metric((kind,), count)
        yield errors
        spool = self._spool
        yield GaugeMetricFamily(
            "forwarder_spool_bytes", "Bytes of the spool's segment files.", value=spool.disk_bytes()
        )
        yield GaugeMetricFamily(
            "forwarder_spool_max_bytes",
            "spool.max_bytes: beyond it new frames are refused while Redis is unavailable.",
            value=spool.max_bytes,
        )
        oldest = spool.oldest_received_at
        yield GaugeMetricFamily(
            "forwarder_spool_oldest_age_seconds",
            "Age of the oldest frame not yet confirmed by Redis (0 when none).",
            value=max(0.0, time.time() - oldest)
            if oldest is not None and spool.pending()[0]
            else 0.0,
        )
        yield CounterMetricFamily(
            "forwarder_spool_corrupt_records",
            "Spool records skipped because their checksum or framing was wrong.",
            value=spool.stats.corrupt_records,
        )
        yield from _spool_health(spool)
        age = self._writer.last_ok_at
        yield GaugeMetricFamily(
            "forwarder_redis_last_success_age_seconds",
            "Seconds since Redis last answered the writer (-1 before the first answer).",
            value=-1.0 if age is None else max(0.0, time.monotonic() - age),
        )
        info = GaugeMetricFamily(
            "forwarder_build_info", "Version of forwarder.", labels=("version",)
        )
        info.add_metric((__version__,), 1.0)
        yield info


def _spool_health(spool: DiskSpool) -> Iterable[Metric]:
    """The spool's disk: can it write, what went through memory only, what was refused or
    lost (none of these has source/event labels)."""
    stats = spool.stats
    yield GaugeMetricFamily(
        "forwarder_spool_writable",
        "1 while the spool's last write to disk succeeded (0: frames go through memory only).",
        value=1.0 if spool.writable else 0.0,
    )
    yield CounterMetricFamily(
        "forwarder_spool_write_errors",
        "Failed writes, fsyncs or state saves in the spool directory (disk full, I/O errors).",
        value=stats.write_errors,
    )
    yield CounterMetricFamily(
        "forwarder_spool_memory_only",
        "Frames the disk could not take, kept in memory only on their way to Redis.",
        value=stats.memory_only,
    )
    yield GaugeMetricFamily(
        "forwarder_spool_memory_only_messages",
        "Frames in memory only now, not yet confirmed by Redis: a crash would lose them.",
        value=spool.memory_only(),
    )
    dropped = CounterMetricFamily(
        "forwarder_spool_dropped",
        "Frames the spool refused, by reason: max_bytes (full while Redis is unavailable) "
        "or write_error (the disk failing and spool.memory_bytes used up).",
        labels=("reason",),
    )
    for reason, count in list(stats.dropped.items()):
        dropped.add_metric((reason,), count)
    yield dropped
    yield CounterMetricFamily(
        "forwarder_spool_lost",
        "Frames the spool had taken and lost before Redis confirmed them (files deleted under "
        "it, or in memory only at the stop).",
        value=stats.lost,
    )
    free = spool.free_bytes()
    if free is not None:
        yield GaugeMetricFamily(
            "forwarder_spool_filesystem_free_bytes",
            "Free bytes on the filesystem of the spool directory.",
            value=free,
        )


def build_registry(collector: ForwarderCollector) -> CollectorRegistry:
    """A fresh registry with forwarder's metrics and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # process_resident_memory_bytes, process_cpu_seconds_total, open fds: the numbers an
    # operator of hundreds of instances checks first.
    ProcessCollector(registry=registry)
    return registry

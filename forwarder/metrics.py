"""Every Prometheus metric forwarder exports, in one place.

The values live in `stats` objects written lock-free by their owning threads; this collector
turns them into metric families at scrape time. Every per-subscription series exists from the
start (value 0), so alerts see zero rather than absence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from forwarder import __version__
from forwarder.spool import DiskSpool
from forwarder.stats import LATENCY_BUCKETS, State, SubscriptionStats, WriterStats

LABELS = ("source", "event")


class ForwarderCollector(Collector):
    """Reads the shared stats on each scrape. Thread-safe (reads only)."""

    def __init__(
        self,
        subscriptions: Callable[[], Sequence[SubscriptionStats]],
        writer: WriterStats,
        spool: DiskSpool,
    ) -> None:
        self._subscriptions = subscriptions
        self._writer = writer
        self._spool = spool

    def collect(self) -> Iterable[Metric]:
        subs = list(self._subscriptions())

        def counter(name: str, doc: str, attr: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            for s in subs:
                family.add_metric(s.labels, getattr(s, attr))
            return family

        def labelled(name: str, doc: str, attr: str, label: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=(*LABELS, label))
            for s in subs:
                for value, count in list(getattr(s, attr).items()):
                    family.add_metric((*s.labels, value), count)
            return family

        yield counter(
            "forwarder_messages_received",
            "WebSocket data frames received, before any validation.",
            "received",
        )
        yield counter(
            "forwarder_messages_forwarded",
            "Frames whose XADD Redis confirmed (dead-lettered frames are not counted).",
            "forwarded",
        )
        yield counter(
            "forwarder_reconnects",
            "Connection attempts made after a connection was lost or an attempt failed.",
            "reconnects",
        )
        yield counter(
            "forwarder_gap_records",
            "Gap records (intervals without receiving) written to the gap stream.",
            "gaps_recorded",
        )
        yield counter(
            "forwarder_messages_dropped",
            "Frames the spool refused (see forwarder_spool_dropped_total for why).",
            "dropped",
        )
        yield labelled(
            "forwarder_close_codes",
            "Connections ended, by close code (4xxx for application codes, 1006 when dropped).",
            "close_codes",
            "code",
        )
        yield labelled(
            "forwarder_handshake_failures",
            "Failed upgrade attempts by HTTP status ('error' when no status was received).",
            "handshake_failures",
            "status",
        )
        yield labelled(
            "forwarder_invalid_messages",
            "Frames that were not a JSON object or array, sent to the dead-letter stream.",
            "invalid",
            "reason",
        )
        connected = GaugeMetricFamily(
            "forwarder_connected", "1 while the subscription is connected.", labels=LABELS
        )
        last = GaugeMetricFamily(
            "forwarder_last_message_timestamp_seconds",
            "Unix time of the last data frame received (0 if none yet).",
            labels=LABELS,
        )
        latency = HistogramMetricFamily(
            "forwarder_forward_latency_seconds",
            "Time from receiving a frame to Redis confirming its XADD.",
            labels=LABELS,
        )
        for s in subs:
            if s.configured:  # a spool-only leftover has no connection to be down
                connected.add_metric(s.labels, 1.0 if s.state is State.CONNECTED else 0.0)
            last.add_metric(s.labels, s.last_message_at or 0.0)
            counts = list(s.latency.counts)
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += count
                buckets.append((_bound(bound), running))
            latency.add_metric(s.labels, buckets, s.latency.sum)
        yield connected
        yield last
        yield latency

        # Upstream resilience (subscriber.py): displacement, blind time, token expiry.
        yield labelled(
            "forwarder_resubscribes",
            "Make-before-break re-subscribes, by trigger (silence watchdog or periodic).",
            "resubscribes",
            "reason",
        )
        yield counter(
            "forwarder_displacements",
            "Re-subscribes after which traffic resumed at once: another client had the feed.",
            "displacements",
        )
        wall_now = time.time()
        flapping = GaugeMetricFamily(
            "forwarder_flapping",
            "1 while the watchdog stands down because another client keeps taking the feed.",
            labels=LABELS,
        )
        blind = CounterMetricFamily(
            "forwarder_disconnected_seconds",
            "Seconds the subscription was not receiving: disconnected, or displaced (once seen).",
            labels=LABELS,
        )
        expiry: dict[str, float] = {}
        for s in subs:
            until = s.flapping_until
            flapping.add_metric(s.labels, 1.0 if until is not None and until > wall_now else 0.0)
            blind.add_metric(s.labels, s.blind_seconds(wall_now))
            exp = s.token_expires_at
            if exp is not None:
                # Subscriptions re-read the token at different times: the newest token (the
                # latest exp) is the one the next reconnect will use.
                expiry[s.source] = max(exp, expiry.get(s.source, exp))
        yield flapping
        yield blind
        token = GaugeMetricFamily(
            "forwarder_token_expiry_timestamp_seconds",
            "The token's exp claim (read without verifying it); absent when it has none.",
            labels=("source",),
        )
        for source, exp in expiry.items():
            token.add_metric((source,), exp)
        yield token

        errors = CounterMetricFamily(
            "forwarder_redis_errors", "Failed Redis calls by error class.", labels=("kind",)
        )
        for kind, count in list(self._writer.errors.items()):
            errors.add_metric((kind,), count)
        yield errors

        spool = self._spool
        pending = GaugeMetricFamily(
            "forwarder_spool_pending_messages",
            "Frames (and gap records) spooled and not yet confirmed by Redis.",
            labels=LABELS,
        )
        by_route = list(spool.pending_by_route)
        for index, s in enumerate(subs):
            pending.add_metric(s.labels, by_route[index] if index < len(by_route) else 0)
        yield pending
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


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def build_registry(collector: ForwarderCollector) -> CollectorRegistry:
    """A fresh registry with forwarder's metrics and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # process_resident_memory_bytes, process_cpu_seconds_total, open fds: the numbers an
    # operator of hundreds of instances checks first.
    ProcessCollector(registry=registry)
    return registry

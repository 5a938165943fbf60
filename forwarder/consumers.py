"""The consumer-group monitor: per-stream and per-group metrics, and the retention step.

One thread ("consumers"), owned by the daemon, visits every stream forwarder writes once per
`[consumers] interval`. It runs one Lua script (streaminfo.OBSERVE, or retention.TRIM under
`retention = "acked"`) per chunk of `CHUNK` streams, which answers for each of them, and the
chunks are spread evenly over the interval (and `streams_per_second`), so the cost is bounded
and smooth: with 10,000 streams, 10 calls a second.

It gives way to the writer, whose job matters more: a round is skipped (counted in
`forwarder_consumer_rounds_skipped_total{reason}`, logged at most every 5 minutes) when the
writer has no recent success or a backlog, when a chunk takes longer than
SLOW_CHUNK_SECONDS, or when Redis answers with an error. The metrics then keep the values
of the last observation; `forwarder_consumer_stats_age_seconds` says how old they are.

A refusal only a human can fix (an ACL without XINFO/XTRIM, a server without the commands)
is an ERROR, shown on `/readyz` until a round completes again, and under retention "acked"
(where the monitor keeps Redis' memory bounded) makes it answer 503.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.exceptions as rex
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forwarder.config import Config, ConsumersConfig
from forwarder.retention import TRIM, Retention, TrimResult, parse_trim
from forwarder.sink import error_kind
from forwarder.stats import WriterStats
from forwarder.streaminfo import LAG_SCAN, OBSERVE, NotAStream, StreamFacts, parse_facts

log = logging.getLogger(__name__)

CHUNK = 25  # streams per script call (and round trip)
SPREAD = 0.8  # the chunks of a round start within this fraction of the interval
SLOW_CHUNK_SECONDS = 0.5  # a chunk this slow means Redis is struggling: stop the round
LOG_INTERVAL = 300.0  # seconds between two log lines about the same kind of skip
SKIPS_BEFORE_WARNING = 3
# Errors that mean "not now" (the next round may work) rather than "fix the setup".
TRANSIENT = frozenset({"connection", "timeout", "busy", "loading", "oom", "readonly"})


class UnreadTrimTracker:
    """Counts entries trimmed before a group was delivered them, from successive snapshots.

    Used with `retention = "maxlen"`, where the writer's XADD trims and nobody can see it
    happen. Offsets: Redis counts `entries_added`; an entry's offset is its position in that
    count, so the head has lost `entries_added - length` entries (`StreamFacts.head_offset`).
    A group whose next entry is gone (behind the head) lost the removed entries after its
    own position: `entries_read` when Redis keeps it, else what was already counted. Exact
    for a group that stays behind (a stopped or crashed consumer); for a group that falls
    behind and skips the gap within one round it is a lower bound. Losses before forwarder
    first saw the group are not counted. Not thread-safe: the monitor thread's.
    """

    def __init__(self) -> None:
        self._counted: dict[tuple[str, str], int] = {}  # offset up to which losses are counted

    def observe(self, stream: str, facts: StreamFacts) -> dict[str, int]:
        """{group: entries newly lost} since the previous snapshot of `stream`."""
        head = facts.head_offset
        lost: dict[str, int] = {}
        if head is None:  # holes inside the stream: the offsets are unknown this round
            return lost
        for group in facts.groups:
            key = (stream, group.name)
            counted = self._counted.get(key)
            if counted is None:
                self._counted[key] = head
                continue
            if facts.behind_head(group):
                position = group.entries_read if group.entries_read is not None else counted
                new = head - max(counted, position)
                if new > 0:
                    lost[group.name] = new
            self._counted[key] = max(counted, head)
        return lost

    def forget(self, keep: set[str]) -> None:
        for key in [k for k in self._counted if k[0] not in keep]:
            del self._counted[key]


@dataclass(frozen=True)
class MonitorSnapshot:
    """A consistent copy of the monitor's state for one scrape."""

    facts: dict[str, StreamFacts]
    unread: dict[tuple[str, str], int]
    trimmed: dict[tuple[str, str], int]  # {(stream, reason): entries}
    rounds: int
    skipped: dict[str, int]
    stats_age: float | None  # seconds since the last complete round
    mode: str
    native: bool


@dataclass
class _State:
    facts: dict[str, StreamFacts] = field(default_factory=dict)
    unread: dict[tuple[str, str], int] = field(default_factory=dict)
    trimmed: dict[tuple[str, str], int] = field(default_factory=dict)
    rounds: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    last_round_at: float | None = None


def build_monitor(
    config: Config,
    client: redis.Redis,
    streams: Callable[[], Iterable[str]],
    writer: WriterStats,
    pending: Callable[[], int],
    stale_after: float,
) -> StreamMonitor:
    """The daemon's monitor: retention "acked" if configured, giving way to the writer when
    Redis has not answered it for `stale_after` seconds or 10 batches wait in the spool."""
    acked = config.redis.retention == "acked"
    return StreamMonitor(
        client,
        streams,
        config.consumers,
        Retention(config.redis.maxlen) if acked else None,
        busy=writer_busy(writer, pending, 10 * config.redis.batch_max, stale_after),
    )


def writer_busy(
    writer: WriterStats,
    pending: Callable[[], int],
    backlog: int,
    stale_after: float,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], str | None]:
    """A `busy` predicate for StreamMonitor: why the writer needs Redis more, or None."""

    def busy() -> str | None:
        last = writer.last_ok_at
        if last is None or clock() - last > stale_after:
            return "Redis has not answered the writer recently"
        waiting = pending()
        if waiting > backlog:
            return f"{waiting} frames wait for the writer"
        return None

    return busy


def round_seconds(streams: int, interval: float, streams_per_second: float) -> float:
    """How long one round over `streams` lasts: `interval`, or longer when visiting them all
    in that time would exceed `streams_per_second` (0: no bound)."""
    if streams_per_second <= 0:
        return interval
    return max(interval, streams / streams_per_second)


class StreamMonitor:
    """Owns the "consumers" thread. `start()` returns at once; `stop()` then `join()`.

    Thread-safety: `start`, `stop`, `join`, `is_alive`, `problem` and `snapshot` may be
    called from any thread (the state is guarded by a lock); `run_round` runs on the monitor
    thread, or in tests on the caller's thread while the monitor thread is not started.
    """

    def __init__(
        self,
        client: redis.Redis,
        streams: Callable[[], Iterable[str]],
        config: ConsumersConfig,
        retention: Retention | None = None,
        busy: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        chunk: int = CHUNK,
    ) -> None:
        self._client = client
        self._streams = streams
        self._interval = config.interval
        self._rate = config.streams_per_second
        self._round_length = config.interval  # of the current round: monitor thread only
        self._retention = retention
        self._busy = busy
        self._clock = clock
        self._chunk = chunk
        self._tracker = UnreadTrimTracker()
        self._lock = threading.Lock()
        self._state = _State()
        self._problem: str | None = None
        self._logged_at: dict[str, float] = {}
        self._skipping = 0  # rounds given up in a row
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumers", daemon=True)
        self.failed: BaseException | None = None  # set if the thread died of a bug

    @property
    def enabled(self) -> bool:
        return self._interval > 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop; a Redis call in flight finishes first (socket_timeout)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return not self.enabled or self._thread.is_alive()

    def problem(self) -> str | None:
        """Why the monitor cannot do its job, or None."""
        if self.failed is not None:
            return f"the consumers thread crashed: {self.failed!r}"
        return self._problem

    def readiness(self) -> tuple[bool, str | None]:
        """(ready, problem) for /readyz. Under retention "acked" the monitor keeps Redis'
        memory bounded, so a problem makes forwarder unready; under "maxlen" it only
        observes, so /readyz shows the problem but stays 200 (the stale-statistics alert and
        the ERROR log report it), and a least-privilege writer ACL keeps working."""
        problem = self.problem()
        return (problem is None or self._retention is None), problem

    def snapshot(self) -> MonitorSnapshot:
        with self._lock:
            state = self._state
            age = None if state.last_round_at is None else self._clock() - state.last_round_at
            return MonitorSnapshot(
                facts=dict(state.facts),
                unread=dict(state.unread),
                trimmed=dict(state.trimmed),
                rounds=state.rounds,
                skipped=dict(state.skipped),
                stats_age=age,
                mode="acked" if self._retention is not None else "maxlen",
                native=self._retention is not None and self._retention.native,
            )

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = self._clock()
                self.run_round(paced=True)
                if self._stop.wait(max(0.0, started + self._round_length - self._clock())):
                    return
        except BaseException as exc:  # a bug: shown by /healthz and /readyz
            self.failed = exc
            log.exception("the consumers thread crashed")

    def run_round(self, paced: bool = False) -> bool:
        """Visit every stream once; True if the round completed. `paced` spreads the chunks
        over the round's length (`round_seconds`: the thread); unpaced runs them back to
        back (tests)."""
        started = self._clock()
        streams = sorted(set(self._streams()))
        self._round_length = round_seconds(len(streams), self._interval, self._rate)
        chunks = [streams[i : i + self._chunk] for i in range(0, len(streams), self._chunk)]
        reason = self._busy()  # before any Redis call: nothing competes with a failing writer
        if reason is not None:
            return self._skip("writer", f"the Redis writer comes first: {reason}")
        try:
            if self._retention is not None:
                self._retention.detect(self._client)
            sha = str(self._client.script_load(TRIM if self._retention else OBSERVE))
        except rex.RedisError as exc:
            return self._failed(exc)
        step = self._round_length * SPREAD / max(1, len(chunks))
        for i, chunk in enumerate(chunks):
            if paced and self._stop.wait(max(0.0, started + i * step - self._clock())):
                return False
            if self._stop.is_set():
                return False
            reason = self._busy()
            if reason is not None:
                return self._skip("writer", f"the Redis writer comes first: {reason}")
            t0 = self._clock()
            try:
                replies = self._call(sha, chunk)
            except rex.RedisError as exc:
                return self._failed(exc)
            elapsed = self._clock() - t0
            error = self._apply(chunk, replies)
            if error is not None:
                return self._failed(error)
            if elapsed > SLOW_CHUNK_SECONDS:
                return self._skip(
                    "slow", f"Redis took {elapsed:.2f}s for {len(chunk)} streams: it is struggling"
                )
        with self._lock:
            state = self._state
            state.rounds += 1
            state.last_round_at = self._clock()
            keep = set(streams)
            for gone in [s for s in state.facts if s not in keep]:
                del state.facts[gone]
        self._tracker.forget(set(streams))
        if self._problem is not None or self._skipping >= SKIPS_BEFORE_WARNING:
            log.info("consumer-group monitor: a complete round again (%d streams)", len(streams))
        self._problem = None
        self._skipping = 0
        return True

    def _call(self, sha: str, chunk: Sequence[str]) -> list[Any]:
        """One script call for the whole chunk: a reply per stream, in order."""
        args: list[int] = self._retention.args() if self._retention else [LAG_SCAN]
        replies = self._client.evalsha(sha, len(chunk), *chunk, *args)
        return list(cast("list[Any]", replies))

    def _apply(self, chunk: Sequence[str], replies: list[Any]) -> BaseException | None:
        """Record each stream's reply; the first error that ends the round, if any."""
        for stream, reply in zip(chunk, replies, strict=True):
            if isinstance(reply, BaseException):
                return reply  # NOSCRIPT (Redis restarted mid-round) included: next round
            try:
                if self._retention is not None:
                    result = parse_trim(stream, reply)
                    self._record(stream, result.facts, result.unread, result)
                else:
                    facts = parse_facts(stream, reply)
                    self._record(stream, facts, self._tracker.observe(stream, facts), None)
            except NotAStream as exc:
                # The writer reports it too (WRONGTYPE); here it only leaves a hole.
                self._log("notastream", logging.WARNING, "consumer-group monitor: %s", exc)
        return None

    def _record(
        self,
        stream: str,
        facts: StreamFacts,
        unread: dict[str, int],
        trim: TrimResult | None,
    ) -> None:
        with self._lock:
            state = self._state
            state.facts[stream] = facts
            for group, count in unread.items():
                state.unread[(stream, group)] = state.unread.get((stream, group), 0) + count
            if trim is not None:
                for reason, count in (
                    ("acked", trim.acked),
                    ("ceiling", trim.ceiling),
                    ("maxlen", trim.plain),
                ):
                    if count:
                        key = (stream, reason)
                        state.trimmed[key] = state.trimmed.get(key, 0) + count
        for group, count in unread.items():
            self._log(
                f"unread:{stream}",
                logging.WARNING,
                "stream %r: %d entries were trimmed before consumer group %r read them "
                "(ceiling maxlen, or retention maxlen): that group lost them",
                stream,
                count,
                group,
            )

    def _failed(self, exc: BaseException) -> bool:
        kind = error_kind(exc)
        if isinstance(exc, rex.NoScriptError):
            kind = "noscript"
        if kind in TRANSIENT or kind == "noscript":
            if kind == "connection" and self._retention is not None:
                self._retention.reset()  # Redis may come back as another server
            return self._skip(kind, f"Redis error: {exc}")
        # NOPERM, an unknown command, a script error: only a human can fix it.
        self._problem = f"consumer-group monitor: Redis refuses it ({kind}): {exc}"
        self._log(
            f"problem:{kind}",
            logging.ERROR,
            "%s; grant the forwarder user +xinfo +xpending +xrange +xlen +xtrim (see README, "
            "Consuming the streams); the stream metrics are stale meanwhile",
            self._problem,
        )
        with self._lock:
            self._state.skipped[kind] = self._state.skipped.get(kind, 0) + 1
        return False

    def _skip(self, reason: str, why: str) -> bool:
        with self._lock:
            self._state.skipped[reason] = self._state.skipped.get(reason, 0) + 1
        self._skipping += 1
        # One skip is routine (the first round can come before the writer's first answer);
        # WARN once several rounds in a row were given up.
        if self._skipping >= SKIPS_BEFORE_WARNING:
            self._log(
                f"skip:{reason}",
                logging.WARNING,
                "consumer-group monitor skipped %d rounds in a row; now: %s",
                self._skipping,
                why,
            )
        return False

    def _log(self, key: str, level: int, message: str, *args: object) -> None:
        """Log, at most once per LOG_INTERVAL for the same key."""
        now = self._clock()
        if now - self._logged_at.get(key, -math.inf) >= LOG_INTERVAL:
            self._logged_at[key] = now
            log.log(level, message, *args)


class ConsumerCollector(Collector):
    """The monitor's metrics, read from a snapshot at scrape time. Thread-safe."""

    def __init__(self, monitor: StreamMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        snap = self._monitor.snapshot()
        info = GaugeMetricFamily(
            "forwarder_retention_info",
            "Retention mode, and whether Redis trims acknowledged entries natively (8.2+).",
            labels=("mode", "native"),
        )
        info.add_metric((snap.mode, "true" if snap.native else "false"), 1.0)
        yield info
        if not self._monitor.enabled:  # [consumers] interval = 0: nothing is observed
            return
        sg = ("stream", "group")
        length = GaugeMetricFamily(
            "forwarder_stream_length",
            "Entries in the stream (XLEN), at the last observation.",
            labels=("stream",),
        )
        lag = GaugeMetricFamily(
            "forwarder_consumer_group_lag",
            "Entries in the stream not yet delivered to the consumer group.",
            labels=sg,
        )
        pending = GaugeMetricFamily(
            "forwarder_consumer_group_pending",
            "Entries delivered to the group's consumers and not acknowledged (XPENDING).",
            labels=sg,
        )
        consumers = GaugeMetricFamily(
            "forwarder_consumer_group_consumers", "Consumers the group has.", labels=sg
        )
        oldest = GaugeMetricFamily(
            "forwarder_consumer_group_oldest_pending_age_seconds",
            "Seconds since the group's oldest pending entry was delivered (0 when none).",
            labels=sg,
        )
        unread = CounterMetricFamily(
            "forwarder_stream_trimmed_unread",
            "Entries removed from the stream before the group was delivered them: lost to it.",
            labels=sg,
        )
        for stream, facts in sorted(snap.facts.items()):
            length.add_metric((stream,), facts.length)
            for g in facts.groups:
                labels = (stream, g.name)
                lag.add_metric(labels, g.lag)
                pending.add_metric(labels, g.pending)
                consumers.add_metric(labels, g.consumers)
                idle = g.oldest_pending_idle_ms
                oldest.add_metric(labels, 0.0 if idle is None else idle / 1000.0)
                unread.add_metric(labels, snap.unread.get(labels, 0))
        # Counted groups that no longer exist keep their count until the stream goes.
        for (stream, group), count in sorted(snap.unread.items()):
            facts_now = snap.facts.get(stream)
            if facts_now is not None and all(g.name != group for g in facts_now.groups):
                unread.add_metric((stream, group), count)
        yield from (length, lag, pending, consumers, oldest, unread)
        trimmed = CounterMetricFamily(
            "forwarder_stream_trimmed",
            "Entries forwarder's retention removed, by reason (acked, ceiling, maxlen).",
            labels=("stream", "reason"),
        )
        for (stream, reason), count in sorted(snap.trimmed.items()):
            trimmed.add_metric((stream, reason), count)
        yield trimmed
        yield CounterMetricFamily(
            "forwarder_consumer_rounds",
            "Complete rounds of the consumer-group monitor over every stream.",
            value=snap.rounds,
        )
        skipped = CounterMetricFamily(
            "forwarder_consumer_rounds_skipped",
            "Rounds given up: writer first, Redis slow or failing, or refusing (by reason).",
            labels=("reason",),
        )
        for reason, count in sorted(snap.skipped.items()):
            skipped.add_metric((reason,), count)
        yield skipped
        yield GaugeMetricFamily(
            "forwarder_consumer_stats_age_seconds",
            "Seconds since the last complete round (-1 before the first one).",
            value=-1.0 if snap.stats_age is None else snap.stats_age,
        )

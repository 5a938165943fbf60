"""The Redis writer: one thread that drains the spool into streams, idempotently and in order.

Each batch is one EVALSHA of the batch script (script.py), which skips entries at or below
this writer's high-water mark, XADDs the rest and advances the mark, atomically. redis-py's
own retries are off (they re-send applied writes, see docs/redis.md); we retry ourselves,
and a batch whose reply was lost (timeout, cut connection) can be re-sent safely because
the script never applies an offset twice.

Counting: an entry is `forwarded` when Redis stored it for this process (now, or in an
earlier attempt whose reply was lost). An entry the mark skips although this process never
sent it was stored before a restart: it is counted as a replay, not forwarded again.

When frames are spread over many streams, two calls go in flight on one connection
(window.py): Redis runs one while this thread prepares the next.

Frames that are not a JSON object or array go to the subscription's dead-letter stream with
a reason, in the same batch; frames Redis refuses on their merits go there afterwards, with
the error. Nothing is lost and order within each stream is kept.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import hiredis
import redis.exceptions as rex

from forwarder.config import RedisConfig
from forwarder.errors import NotReplicated
from forwarder.pacing import Pacer
from forwarder.redis_target import RedisTarget
from forwarder.script import (
    REFUSED,
    SKIPPED,
    WRITE_BATCH,
    WRITTEN,
    Packer,
    Reply,
    dead_letter_fields,
    gap_fields,
    parse_reply,
)
from forwarder.spool import GAP, Batch, DiskSpool, Entry
from forwarder.stats import SubscriptionStats, WriterStats
from forwarder.window import Window, disjoint_run

__all__ = ["IDLE_PING_SECONDS", "RedisWriter", "dead_letter_fields", "error_kind", "gap_fields"]

log = logging.getLogger(__name__)

IDLE_PING_SECONDS = 5.0
# Two calls in flight (window.py) once at least 2 x this many entries wait, for at most this
# many calls before the writer's loop turns again (idle pings, stop, pacing).
WINDOW_MIN_ENTRIES = 32
WINDOW_MAX_CALLS = 64
CONFIG_ERROR_RETRY_SECONDS = 30.0
CONFIG_ERROR_KINDS = ("noperm", "wrongtype")
AUTH_RETRY_SECONDS = 5.0  # a password fixed in Redis (ACL SETUSER) is picked up this fast
ERROR_LOG_INTERVAL = 60.0  # seconds between two ERROR lines about failing authentication
SLOW_LOG_INTERVAL = 60.0  # seconds between two WARNING lines about a slow Redis
FAILURE_LOG_INTERVAL = 10.0  # a new outage is logged at once, a flapping one not every time

# Outcomes of an entry in a batch (see _settle).
STORED = 0  # in Redis, written by this process
REPLAYED = 1  # in Redis already before this process sent it (a restart's replay)
REJECTED = 2  # refused by Redis on its merits: goes to the dead-letter stream


class Segment(NamedTuple):
    """Entries one script call settled, in order, and how."""

    part: Batch
    outcomes: bytes | None  # one STORED/REPLAYED/REJECTED per entry; None: all STORED
    refused: dict[int, str]  # offset -> Redis' error, for the REJECTED ones
    invalid: dict[int, str]  # offset -> dead-letter reason of invalid frames


def error_kind(exc: BaseException) -> str:
    """Bounded class of a Redis error (the `kind` label of forwarder_redis_errors_total)."""
    # redis-py strips the error prefix (READONLY, OOM…) from the message and maps it to a
    # class; replies it does not map keep their prefix in the text.
    if isinstance(exc, NotReplicated):
        return "replication"
    for cls, kind in (
        (rex.AskError, "cluster"),  # MOVED, ASK, TRYAGAIN, CLUSTERDOWN: slots on the move
        (rex.TryAgainError, "cluster"),
        (rex.ClusterDownError, "cluster"),
        (rex.SlotNotCoveredError, "cluster"),
        (rex.TimeoutError, "timeout"),
        (rex.AuthenticationError, "auth"),  # a ConnectionError subclass: test it first
        (rex.AuthenticationWrongNumberOfArgsError, "auth"),
        (rex.BusyLoadingError, "loading"),
        (rex.ConnectionError, "connection"),
        (rex.ReadOnlyError, "readonly"),
        (rex.OutOfMemoryError, "oom"),
        (rex.NoPermissionError, "noperm"),
    ):
        if isinstance(exc, cls):
            return kind
    text = str(exc).upper()
    if "CAN'T RUN" in text or "CAN'T ACCESS" in text or "NO PERMISSIONS" in text:
        return "noperm"  # ACL refusals inside a script (Redis 7.0 words them this way)
    for prefix, kind in (
        ("OOM", "oom"),
        ("READONLY", "readonly"),
        ("LOADING", "loading"),
        ("BUSY", "busy"),
        ("MASTERDOWN", "readonly"),
        ("NOPERM", "noperm"),
        ("WRONGTYPE", "wrongtype"),
        ("WRONGPASS", "auth"),
        ("NOAUTH", "auth"),
        ("NOREPLICAS", "replication"),
        ("CROSSSLOT", "cluster"),
    ):
        if text.startswith(prefix):
            return kind
    return "other"


class RedisWriter:
    """Owns the writer thread. `start()` returns at once; `stop()` then `join()` to finish.

    Thread-safety: `start`, `stop`, `abandon`, `join` and the properties may be called from
    any thread; everything else runs on the writer thread.
    """

    def __init__(
        self,
        target: RedisTarget,
        spool: DiskSpool,
        stats: Sequence[SubscriptionStats],
        writer_stats: WriterStats,
        config: RedisConfig,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._target = target
        self._spool = spool
        self._stats = stats  # by route index, like the spool's routes
        self._wstats = writer_stats
        self._config = config
        self._rand = rand
        self._sha = hashlib.sha1(WRITE_BATCH.encode()).hexdigest()  # noqa: S324 - Redis' name
        self._packer = Packer(
            spool.routes, config.maxlen, config.gap_stream, spool.writer_id, target.cluster
        )
        # WAIT n ms after each call (see docs/redis.md, "Replicas and failover").
        self._wait_command = (
            hiredis.pack_command(
                ("WAIT", config.wait_replicas, max(1, int(config.wait_timeout * 1000)))  # type: ignore[arg-type]
            )
            if config.wait_replicas
            else None
        )
        self._thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        # Set by stop(): exit once the spool is empty or the deadline has passed.
        self._stopping = threading.Event()
        self._deadline = float("inf")  # monotonic; written by stop() before _stopping is set
        self._abandon = threading.Event()  # set by abandon(): give up at once
        self.failed: BaseException | None = None  # set if the thread died of a bug
        self.progress = 0  # incremented on every loop turn: the systemd watchdog's evidence
        # Writer thread only:
        self._pacer = Pacer(config.batch_max, config.socket_timeout)  # batch size, timeout
        self._slow_logged_at = -SLOW_LOG_INTERVAL
        self._failure_logged_at = -FAILURE_LOG_INTERVAL
        self._auth_logged_at = -ERROR_LOG_INTERVAL
        # Offsets of the current batch already sent once: a skipped entry among them was
        # stored by one of our own attempts whose reply was lost, not by an earlier run.
        self._attempted: set[int] = set()
        self._carry: set[int] = set()  # offsets a window sent without a clean reply
        self._serial_next = False  # the last window ended unclean: one call at a time now

    def start(self) -> None:
        self._thread.start()

    def stop(self, deadline: float) -> None:
        """Ask the thread to write what is pending and exit by `deadline` (monotonic)."""
        self._deadline = deadline
        self._stopping.set()
        self._spool.wake()

    def abandon(self) -> None:
        """Stop retrying at once (second signal)."""
        self._abandon.set()
        self.stop(time.monotonic())

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._idle_ping()  # readiness knows about Redis from the first second
            while True:
                self.progress += 1
                # Once stopping, do not wait for more: exit as soon as the spool is empty.
                timeout = 0.0 if self._stopping.is_set() else IDLE_PING_SECONDS
                limit = self._pacer.limit
                windowed = self._windowed()
                # A window looks a little past the batch for a run it may send second.
                probe = max(WINDOW_MIN_ENTRIES, limit // 8) if windowed else 0
                batch = self._spool.peek(limit + probe, timeout)
                if not batch:
                    if self._stopping.is_set():
                        return
                    self._idle_ping()
                    continue
                if windowed and len(batch) >= 2 * WINDOW_MIN_ENTRIES and self._window(batch, limit):
                    continue
                batch = batch[:limit]
                self._serial_next = False
                done = self._write(batch)
                if done is None:
                    pending, _ = self._spool.pending()
                    log.warning(
                        "shutdown deadline reached with Redis unavailable: %d frames stay in "
                        "the spool and are written after the next start",
                        pending,
                    )
                    return
                self._spool.commit(batch[:done])
        except BaseException as exc:  # a bug: report it through /healthz and the exit code
            self.failed = exc
            log.exception("the Redis writer thread crashed")

    def _windowed(self) -> bool:
        """Whether the next batches may go two in flight (window.py says when that is safe)."""
        return not (
            self._serial_next
            or self._target.cluster
            or self._wait_command is not None
            or self._wstats.config_error is not None
            or self._stopping.is_set()
            or not self._pacer.normal()
        )

    def _window(self, batch: Batch, limit: int) -> bool:
        """Write from the head of `batch` (a peek of a little more than `limit`) with two
        calls in flight; on anything but clean replies, the next turn writes one call at a
        time. False: nothing could go second (one busy stream): write it the usual way."""
        first, rest = batch[:limit], batch[limit:]
        routes = self._spool.routes
        if not rest:  # it all fits one call: halve it if the halves can go in parallel
            half = (len(batch) + 1) // 2
            first, rest = batch[:half], batch[half:]
        if not disjoint_run(routes, first, rest, 1):
            return False
        try:
            connection = self._target.connection(
                self._spool.routes[first[0][1].subscription].stream
            )
        except rex.RedisError:
            self._serial_next = True  # the one-at-a-time path retries, counts and logs
            return True
        window = Window(self._spool, self._packer, self._sha, connection, self._window_wrote)
        if window.run(first, rest, limit, WINDOW_MAX_CALLS, self._windowed):
            return True
        self._carry |= window.sent
        self._serial_next = True
        if window.error is not None:
            self._target.failed(window.error)
            self._record_error(window.error)
        return True

    def _window_wrote(self, part: Batch, invalid: dict[int, str]) -> None:
        """A call of the window came back clean and its entries are committed."""
        self.progress += 1
        self._wstats.last_ok_at = time.monotonic()
        self._wstats.batches += 1
        self._spool.writer_ok(True)
        self._account([Segment(part, None, {}, invalid)])

    def _idle_ping(self) -> None:
        try:
            self._target.ping()
        except rex.RedisError as exc:
            self._target.failed(exc)
            if self._record_error(exc) == "auth":
                self._auth_error(exc)
        else:
            self._wstats.last_ok_at = time.monotonic()
            if self._wstats.config_error_kind == "auth":
                self._clear_config_error()

    def _write(self, batch: Batch) -> int | None:
        """Write `batch` until Redis confirms all of it and count it; returns its length,
        or None if the shutdown deadline passed."""
        floor = batch[0][0]
        # Earlier batches are committed: never sent again. A window's calls whose replies
        # were not clean may have been applied (window.py): those offsets count as sent.
        self._carry = {offset for offset in self._carry if offset >= floor}
        self._attempted = set(self._carry)
        segments: list[Segment] = []
        for group in self._packer.groups(batch, {}):  # one per hash slot on a cluster
            done = self._settle_all(group, {}, floor, "")
            if done is None:
                return None
            segments += done
        rejected = self._account(segments)
        if rejected and not self._dead_letter_rejected(rejected, floor):
            return None
        return len(batch)

    def _settle_all(
        self, entries: Batch, rejected: dict[int, str], floor: int, suffix: str
    ) -> list[Segment] | None:
        """`_settle` until every one of `entries` is settled; None at the deadline."""
        segments: list[Segment] = []
        count = 0
        while count < len(entries):
            done = self._settle(entries[count:], rejected, floor, suffix)
            if done is None:
                return None
            segments += done
            count += sum(len(segment.part) for segment in done)
        return segments

    def _settle(
        self, entries: Batch, rejected: dict[int, str], floor: int, suffix: str
    ) -> list[Segment] | None:
        """Send `entries` (a prefix of them when Redis is slow) until Redis has settled
        each one; None if the shutdown deadline passed.

        A call that stops at a configuration error (NOPERM, WRONGTYPE on one stream) keeps
        the outcomes of the entries before it and waits; the retry starts at the entry that
        stopped it. `floor`: the first uncommitted offset of the spool.
        """
        segments: list[Segment] = []
        pos = 0
        while True:
            got = self._call(entries[pos:], rejected, floor, suffix)
            if got is None:
                return None
            part, reply, invalid = got
            statuses = reply.statuses
            n = len(statuses)
            done = part if n == len(part) else part[:n]
            outcomes = None  # the usual case: every entry written by this call
            if statuses.count(WRITTEN) != n:
                attempted = self._attempted
                outcomes = bytes(
                    REJECTED
                    if status == REFUSED
                    else REPLAYED
                    if status == SKIPPED and offset not in attempted
                    else STORED
                    for (offset, _), status in zip(done, statuses, strict=True)
                )
            segments.append(Segment(done, outcomes, reply.refused, invalid))
            if reply.stopped is None:
                return segments
            # NOPERM or WRONGTYPE: only a human can fix it. Keep everything from this entry
            # on in the spool and retry slowly; what Redis settled before it stays settled.
            _, error = reply.stopped
            pos += n
            kind = error_kind(rex.ResponseError(error))
            self._wstats.errors[kind] = self._wstats.errors.get(kind, 0) + 1
            stream = part[n][1]
            route = self._spool.routes[stream.subscription]
            self._spool.writer_ok(False)
            self._config_error(kind, f"stream {route.stream!r}: {error}", len(entries) - pos)
            if self._wait(CONFIG_ERROR_RETRY_SECONDS):
                return None

    def _dead_letter_rejected(self, rejected: dict[int, tuple[Entry, str]], floor: int) -> bool:
        """Send entries Redis refused (e.g. too large for the server's limits, or a stream
        that cannot take more) to the dead-letter stream with the error, instead of retrying
        them forever and blocking every other stream. Their own high-water mark keeps this
        idempotent too. False if the shutdown deadline passed."""
        errors = {offset: error for offset, (_, error) in rejected.items()}
        entries: Batch = [(offset, entry) for offset, (entry, _) in rejected.items()]
        for group in self._packer.groups(entries, errors):
            segments = self._settle_all(group, errors, floor, ":rejected")
            if segments is None:
                return False
            for segment in segments:
                for i, (offset, entry) in enumerate(segment.part):
                    stats = self._stats[entry.subscription]
                    if segment.outcomes is not None and segment.outcomes[i] == REJECTED:
                        log.error(
                            "a frame of %s/%s was refused by Redis (%s) and so was its "
                            "dead-letter entry (%s): it is lost",
                            stats.source,
                            stats.event,
                            errors.get(offset),
                            segment.refused.get(offset),
                        )
                        stats.lost += 1
                    else:
                        invalid = stats.invalid
                        invalid["redis_rejected"] = invalid.get("redis_rejected", 0) + 1
        return True

    def _call(
        self, entries: Batch, rejected: dict[int, str], floor: int, suffix: str
    ) -> tuple[Batch, Reply, dict[int, str]] | None:
        """Run the script on `entries` (or, after timeouts, a prefix) until Redis answers.

        Returns (the entries sent, the reply, their dead-letter reasons); None if the
        shutdown deadline passed. Entries of failed attempts join `_attempted` (Redis may
        have applied them).
        """
        failures = 0
        while True:
            part = entries[: self._pacer.limit]
            call = self._packer.pack(part, rejected, floor, suffix)
            started = time.monotonic()
            try:
                reply = parse_reply(self._evalsha(call.keys, call.args))
            except (rex.RedisError, NotReplicated) as exc:
                self._attempted.update(offset for offset, _ in part)
                self._target.failed(exc)  # e.g. reload a cluster's slot map
                self._spool.writer_ok(False)  # readers must not wait for us now
                kind = self._record_error(exc)
                failures += 1
                if kind == "timeout":
                    self._slow_down(len(part))
                if kind == "auth":
                    self._auth_error(exc)
                    if self._wait(AUTH_RETRY_SECONDS):
                        return None
                    continue
                if kind in CONFIG_ERROR_KINDS:
                    # The whole script refused (EVALSHA not allowed, a key not allowed): a
                    # human must act. Loud, slow, and nothing leaves the spool meanwhile.
                    self._config_error(kind, str(exc), len(entries))
                    if self._wait(CONFIG_ERROR_RETRY_SECONDS):
                        return None
                    continue
                delay = min(5.0, 0.05 * 2.0**failures) * (0.5 + self._rand() / 2.0)
                now = time.monotonic()
                if failures % 20 == 0 or (
                    failures == 1 and now - self._failure_logged_at >= FAILURE_LOG_INTERVAL
                ):
                    self._failure_logged_at = now
                    log.warning(
                        "Redis write failed (%s, attempt %d), %d frames kept in the spool; "
                        "retrying in %.2fs: %s",
                        kind,
                        failures,
                        len(entries),
                        delay,
                        exc,
                    )
                if self._wait(delay):
                    return None
                continue
            self._speed_up(time.monotonic() - started)
            self._wstats.last_ok_at = time.monotonic()
            self._clear_config_error()
            self._wstats.batches += 1
            self._spool.writer_ok(True)
            if failures:
                log.info("Redis writes recovered after %d failed attempts", failures)
            return part, reply, call.invalid

    def _slow_down(self, size: int) -> None:
        """A call timed out: Redis may be slow rather than gone (see pacing.py). Re-sending
        what the timed-out call may have applied is safe: the mark skips it."""
        self._pacer.timed_out(size)
        self._target.set_socket_timeout(self._pacer.timeout)
        now = time.monotonic()
        if now - self._slow_logged_at >= SLOW_LOG_INTERVAL:
            self._slow_logged_at = now
            log.warning(
                "Redis did not answer a batch of %d entries within redis.socket_timeout "
                "(%.1fs): sending batches of at most %d and waiting up to %.1fs for a reply "
                "until it answers quickly again",
                size,
                self._config.socket_timeout,
                self._pacer.limit,
                self._pacer.timeout,
            )

    def _speed_up(self, elapsed: float) -> None:
        if self._pacer.normal():
            return
        if self._pacer.answered(elapsed):
            self._target.set_socket_timeout(self._pacer.timeout)
        if self._pacer.normal():
            log.info("Redis answers quickly again: batches back to %d entries", self._pacer.limit)

    def _config_error(self, kind: str, error: str, size: int) -> None:
        self._wstats.config_error = error
        self._wstats.config_error_kind = kind
        log.error(
            "Redis refuses our writes (%s): fix the key type or the ACL (see README, Redis "
            "ACL); %d frames and everything after them stay in the spool; retrying in %.0fs",
            error,
            size,
            CONFIG_ERROR_RETRY_SECONDS,
        )

    def _auth_error(self, exc: BaseException) -> None:
        """Wrong password or unknown user: not an outage, a human must fix redis.url or the
        Redis ACL. /readyz says so; the ERROR is repeated at most once a minute."""
        self._wstats.config_error = f"authentication failed: {exc}"
        self._wstats.config_error_kind = "auth"
        now = time.monotonic()
        if now - self._auth_logged_at >= ERROR_LOG_INTERVAL:
            self._auth_logged_at = now
            pending, _ = self._spool.pending()
            log.error(
                "Redis refused our credentials (%s): check the user and password in redis.url "
                "and the Redis ACL (see README, Redis ACL); %d frames stay in the spool; "
                "retrying every %.0fs",
                exc,
                pending,
                AUTH_RETRY_SECONDS,
            )

    def _clear_config_error(self) -> None:
        self._wstats.config_error = None
        self._wstats.config_error_kind = None

    def _evalsha(self, keys: list[str], args: list[bytes | str | int]) -> object:
        """EVALSHA of WRITE_BATCH on the node that owns the call's keys, packed by hiredis in
        one C call (redis-py's own packing walks every argument in Python, four per frame
        here: it was the writer's largest cost), then WAIT on the same connection if
        `wait_replicas` asks for it; NotReplicated if fewer replicas confirmed."""
        command = hiredis.pack_command(
            ("EVALSHA", self._sha, len(keys), *keys, *args)  # type: ignore[arg-type]
        )
        reply, acks = self._target.run(keys[0], command, WRITE_BATCH, self._wait_command)
        wanted = self._config.wait_replicas
        if self._wait_command is not None and (not isinstance(acks, int) or acks < wanted):
            raise NotReplicated(
                f"only {acks} of {wanted} replicas confirmed the batch within "
                f"{self._config.wait_timeout}s (redis.wait_replicas): kept in the spool"
            )
        return reply

    def _wait(self, delay: float) -> bool:
        """Sleep before a retry; True if we must give up (shutdown deadline or abandon).

        Sleeps in slices of at most a second so `progress` keeps moving: waiting on Redis is
        the writer doing its job, and the systemd watchdog must not kill us for it.
        """
        end = time.monotonic() + delay
        while True:
            self.progress += 1
            now = time.monotonic()
            remaining = self._deadline - now
            if self._abandon.is_set() or (self._stopping.is_set() and remaining <= 0):
                return True
            step = min(1.0, end - now, max(remaining, 0.0))
            if step <= 0:
                return False
            if self._abandon.wait(step):
                return True

    def _account(self, segments: list[Segment]) -> dict[int, tuple[Entry, str]]:
        """Update the counters; return {offset: (entry, error)} of the entries Redis refused
        (for the dead-letter pass). Per frame: the common segment takes the short loop."""
        rejected: dict[int, tuple[Entry, str]] = {}
        now = time.time()
        all_stats = self._stats
        for segment in segments:
            outcomes, invalid = segment.outcomes, segment.invalid
            if outcomes is None and not invalid:
                for _, entry in segment.part:
                    stats = all_stats[entry.subscription]
                    if entry.opcode == GAP:
                        stats.gaps_recorded += 1
                    else:
                        stats.forwarded += 1
                        stats.latency.observe(now - entry.received_at)
                continue
            for i, (offset, entry) in enumerate(segment.part):
                outcome = STORED if outcomes is None else outcomes[i]
                if outcome == REJECTED:
                    rejected[offset] = (entry, segment.refused.get(offset) or "refused")
                    continue
                if outcome == REPLAYED:
                    self._wstats.replayed += 1  # stored before a restart: not forwarded again
                    continue
                stats = all_stats[entry.subscription]
                reason = invalid.get(offset)
                if entry.opcode == GAP:
                    stats.gaps_recorded += 1
                elif reason is not None:
                    stats.invalid[reason] = stats.invalid.get(reason, 0) + 1
                else:
                    stats.forwarded += 1
                    stats.latency.observe(now - entry.received_at)
        return rejected

    def _record_error(self, exc: BaseException) -> str:
        kind = error_kind(exc)
        errors = self._wstats.errors
        errors[kind] = errors.get(kind, 0) + 1
        self._wstats.last_error = f"{kind}: {exc}"
        return kind

"""The Redis writer: one thread that drains the spool into streams, idempotently and in order.

Each batch is one EVALSHA of `WRITE_BATCH`, a Lua script that skips entries whose offset is
at or below this writer's high-water mark, XADDs the rest, and advances the mark, atomically.
redis-py's own retries are turned off (they re-send applied writes: library-pitfalls.md
section 2.2); we retry ourselves, and a batch whose reply was lost (timeout, cut connection)
can be re-sent safely because the script never applies an offset twice.

Frames that are not a JSON object or array go to the subscription's dead-letter stream with
a reason, in the same batch, so nothing is lost and order within each stream is kept.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

import orjson
import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from forwarder.config import RedisConfig, Subscription
from forwarder.decode import invalid_reason
from forwarder.errors import SinkError
from forwarder.frames import Oversized
from forwarder.spool import GAP, Entry, MemorySpool, entry_size
from forwarder.stats import SubscriptionStats, WriterStats

log = logging.getLogger(__name__)

HWM_TTL_SECONDS = 7 * 24 * 3600
IDLE_PING_SECONDS = 5.0

# KEYS[1]: the high-water-mark key; KEYS[2..]: streams.
# ARGV: first offset, hwm ttl, maxlen (0 = none), then per entry:
#   stream key index, trim flag (1/0), field count n, n field/value items.
# Returns {written, {offset, error, offset, error, ...}} for entries whose XADD failed.
# The `#!lua` line makes Redis 7 refuse the whole script up front under OOM, instead of
# failing half-way (a partly applied batch could not be told from an unapplied one).
WRITE_BATCH = """#!lua
local hwm = tonumber(redis.call('GET', KEYS[1]) or '0')
local first = tonumber(ARGV[1])
local maxlen = ARGV[3]
local i = 4
local off = first
local last = first - 1
local j = 4
while j <= #ARGV do
  last = last + 1
  j = j + 3 + tonumber(ARGV[j + 2])
end
if last <= hwm then
  return {0, {}}
end
redis.call('SET', KEYS[1], last, 'EX', ARGV[2])
local written = 0
local errors = {}
while i <= #ARGV do
  local n = tonumber(ARGV[i + 2])
  if off > hwm then
    local cmd = {'XADD', KEYS[tonumber(ARGV[i])]}
    if ARGV[i + 1] == '1' and maxlen ~= '0' then
      cmd[3] = 'MAXLEN'; cmd[4] = '~'; cmd[5] = maxlen
    end
    cmd[#cmd + 1] = '*'
    for k = 1, n do cmd[#cmd + 1] = ARGV[i + 2 + k] end
    local r = redis.pcall(unpack(cmd))
    if type(r) == 'table' and r.err then
      errors[#errors + 1] = off
      errors[#errors + 1] = r.err
    else
      written = written + 1
    end
  end
  i = i + 3 + n
  off = off + 1
end
return {written, errors}
"""


def error_kind(exc: BaseException) -> str:
    """Bounded class of a Redis error (the `kind` label of forwarder_redis_errors_total)."""
    if isinstance(exc, rex.TimeoutError):
        return "timeout"
    if isinstance(exc, rex.BusyLoadingError):
        return "loading"
    if isinstance(exc, rex.ConnectionError):
        return "connection"
    text = str(exc).upper()
    for prefix, kind in (
        ("OOM", "oom"),
        ("READONLY", "readonly"),
        ("LOADING", "loading"),
        ("BUSY", "busy"),
        ("NOPERM", "noperm"),
        ("NO PERMISSIONS", "noperm"),
    ):
        if text.startswith(prefix) or f" {prefix}" in text[:80]:
            return kind
    if isinstance(exc, rex.NoPermissionError):
        return "noperm"
    return "other"


def make_client(config: RedisConfig) -> redis.Redis:
    """A Redis client with timeouts on and redis-py's automatic re-sends off."""
    return redis.Redis.from_url(
        config.url,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisWriter:
    """Owns the writer thread. `start()` returns at once; `stop()` then `join()` to finish.

    Thread-safety: `start`, `stop`, `join` and the properties may be called from any thread;
    everything else runs on the writer thread.
    """

    def __init__(
        self,
        client: redis.Redis,
        spool: MemorySpool,
        subscriptions: Sequence[Subscription],
        stats: Sequence[SubscriptionStats],
        writer_stats: WriterStats,
        config: RedisConfig,
        writer_id: str,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._spool = spool
        self._subs = subscriptions
        self._stats = stats
        self._wstats = writer_stats
        self._config = config
        self._rand = rand
        self._hwm_key = f"forwarder:hwm:{writer_id}"
        self._script = client.register_script(WRITE_BATCH)
        self._maxlen = str(config.maxlen or 0)
        self._thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        # Set by stop(): exit once the spool is empty or the deadline has passed.
        self._stopping = threading.Event()
        self._deadline = float("inf")  # monotonic; written by stop() before _stopping is set
        self._abandon = threading.Event()  # set by abandon(): give up at once
        self.failed: BaseException | None = None  # set if the thread died of a bug
        self._rejected_offset = 1  # offsets of the dead-letter follow-up writes

    @property
    def hwm_key(self) -> str:
        return self._hwm_key

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
                offset, batch = self._spool.peek(self._config.batch_max, IDLE_PING_SECONDS)
                if not batch:
                    if self._stopping.is_set():
                        return
                    self._idle_ping()
                    continue
                if not self._write(offset, batch):
                    pending, _ = self._spool.pending()
                    log.error(
                        "shutdown deadline reached with Redis unavailable: %d received frames "
                        "were not written",
                        pending,
                    )
                    return
                self._spool.commit(len(batch), sum(entry_size(e) for e in batch))
        except BaseException as exc:  # a bug: report it through /healthz and the exit code
            self.failed = exc
            log.exception("the Redis writer thread crashed")

    def _idle_ping(self) -> None:
        try:
            self._client.ping()
        except rex.RedisError as exc:
            self._record_error(exc)
        else:
            self._wstats.last_ok_at = time.monotonic()

    def _write(self, offset: int, batch: list[Entry]) -> bool:
        """Write one batch until Redis confirms it; False if the shutdown deadline passed."""
        keys, args, invalid = self._prepare(self._hwm_key, offset, batch, {})
        reply = self._call(keys, args, len(batch))
        if reply is None:
            return False
        rejected = self._account(offset, batch, invalid, reply)
        if rejected:
            return self._dead_letter_rejected(rejected)
        return True

    def _dead_letter_rejected(self, rejected: list[tuple[Entry, str]]) -> bool:
        """Send entries Redis refused one by one (e.g. WRONGTYPE on their stream) to the
        dead-letter stream, with the error, instead of retrying them forever and blocking
        every other stream. Uses its own high-water mark and offsets."""
        offset = self._rejected_offset
        self._rejected_offset += len(rejected)
        batch = [entry for entry, _ in rejected]
        errors = {n: error for n, (_, error) in enumerate(rejected)}
        keys, args, _ = self._prepare(self._hwm_key + ":rejected", offset, batch, errors)
        reply = self._call(keys, args, len(batch))
        if reply is None:
            return False
        for n, (entry, error) in enumerate(rejected):
            stats = self._stats[entry.subscription]
            failed = _failures(reply, offset)
            if n in failed:
                log.error(
                    "a frame of %s/%s was refused by Redis (%s) and so was its dead-letter "
                    "entry (%s): it is lost",
                    stats.source,
                    stats.event,
                    error,
                    failed[n],
                )
                stats.lost += 1
            else:
                stats.invalid["redis_rejected"] = stats.invalid.get("redis_rejected", 0) + 1
        return True

    def _call(self, keys: list[str], args: list[bytes | str | int], size: int) -> object | None:
        """Run the script until Redis answers; None if the shutdown deadline passed."""
        failures = 0
        while True:
            try:
                reply: object = self._script(keys=keys, args=args, client=self._client)
            except rex.RedisError as exc:
                kind = self._record_error(exc)
                failures += 1
                delay = min(5.0, 0.05 * 2.0**failures) * (0.5 + self._rand() / 2.0)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "Redis write failed (%s, attempt %d), %d frames kept pending; retrying "
                        "in %.2fs: %s",
                        kind,
                        failures,
                        size,
                        delay,
                        exc,
                    )
                remaining = self._deadline - time.monotonic()
                if self._abandon.is_set() or (self._stopping.is_set() and remaining <= 0):
                    return False
                self._abandon.wait(min(delay, max(remaining, 0.0)))
                continue
            self._wstats.last_ok_at = time.monotonic()
            self._wstats.batches += 1
            if failures:
                log.info("Redis writes recovered after %d failed attempts", failures)
            return reply

    def _prepare(
        self, hwm_key: str, offset: int, batch: list[Entry], rejected: dict[int, str]
    ) -> tuple[list[str], list[bytes | str | int], dict[int, str]]:
        keys = [hwm_key]
        index: dict[str, int] = {}
        args: list[bytes | str | int] = [offset, HWM_TTL_SECONDS, self._maxlen]
        invalid: dict[int, str] = {}
        for n, entry in enumerate(batch):
            stream, trim, fields, reason = self._route(entry, rejected.get(n))
            if reason is not None:
                invalid[n] = reason
            key_index = index.get(stream)
            if key_index is None:
                keys.append(stream)
                key_index = index[stream] = len(keys)
            args += [key_index, trim, len(fields), *fields]
        return keys, args, invalid

    def _route(
        self, entry: Entry, error: str | None
    ) -> tuple[str, str, list[bytes | str | int], str | None]:
        """Where an entry goes: (stream, trim flag, fields, dead-letter reason or None)."""
        sub = self._subs[entry.subscription]
        if error is not None:  # Redis refused it once: dead-letter it with the error
            reason: str | None = "redis_rejected"
        elif entry.opcode == GAP:
            return self._config.gap_stream, "0", gap_fields(sub, entry), None
        else:
            reason = invalid_reason(entry.opcode, entry.payload)
        received_ms = int(entry.received_at * 1000)
        if reason is None:
            assert isinstance(entry.payload, bytes)
            fields: list[bytes | str | int] = [
                "data",
                entry.payload,
                "event",
                sub.event,
                "source",
                sub.source.name,
                "received_at",
                received_ms,
            ]
            return sub.stream, "1", fields, None
        fields = dead_letter_fields(sub, entry, reason, received_ms)
        if error is not None:
            fields += ["error", error]
        return sub.dead_letter_stream, "0", fields, reason

    def _account(
        self, offset: int, batch: list[Entry], invalid: dict[int, str], reply: object
    ) -> list[tuple[Entry, str]]:
        """Update the counters; return the entries Redis refused, with the error."""
        failed = _failures(reply, offset)
        rejected: list[tuple[Entry, str]] = []
        now = time.time()
        for n, entry in enumerate(batch):
            stats = self._stats[entry.subscription]
            if n in failed:
                rejected.append((entry, failed[n]))
                continue
            if entry.opcode == GAP:
                stats.gaps_recorded += 1
                continue
            reason = invalid.get(n)
            if reason is not None:
                stats.invalid[reason] = stats.invalid.get(reason, 0) + 1
                continue
            stats.forwarded += 1
            stats.latency.observe(now - entry.received_at)
        return rejected

    def _record_error(self, exc: BaseException) -> str:
        kind = error_kind(exc)
        errors = self._wstats.errors
        errors[kind] = errors.get(kind, 0) + 1
        self._wstats.last_error = f"{kind}: {exc}"
        return kind


def dead_letter_fields(
    sub: Subscription, entry: Entry, reason: str, received_ms: int
) -> list[bytes | str | int]:
    """The fields of a dead-letter entry: why, where from, and the raw bytes in base64."""
    payload = entry.payload
    fields: list[bytes | str | int] = [
        "reason",
        reason,
        "event",
        sub.event,
        "source",
        sub.source.name,
        "received_at",
        received_ms,
        "opcode",
        int(entry.opcode),  # hiredis packs exact ints only, not IntEnum
    ]
    if isinstance(payload, Oversized):
        fields += [
            "size",
            payload.size,
            "truncated",
            1,
            "sha256",
            payload.sha256,
            "data_base64",
            base64.b64encode(payload.head),
        ]
    else:
        fields += ["size", len(payload), "truncated", 0, "data_base64", base64.b64encode(payload)]
    return fields


def gap_fields(sub: Subscription, entry: Entry) -> list[bytes | str | int]:
    """The fields of a gap record: source, event, then the record's own (start, end, cause…)."""
    fields: list[bytes | str | int] = ["source", sub.source.name, "event", sub.event]
    try:
        record = orjson.loads(entry.payload) if isinstance(entry.payload, bytes) else {}
    except orjson.JSONDecodeError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    for key, value in record.items():
        fields += [str(key), value if isinstance(value, int | str) else orjson.dumps(value)]
    return fields


def _failures(reply: object, offset: int) -> dict[int, str]:
    """{index in batch: error} from the script's reply."""
    failed: dict[int, str] = {}
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list):
        errs = reply[1]
        for k in range(0, len(errs) - 1, 2):
            failed[int(errs[k]) - offset] = _text(errs[k + 1])
    return failed


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_redis(client: redis.Redis) -> None:
    """One PING; raises SinkError with a bounded kind. Used by check-config and tests."""
    try:
        client.ping()
    except rex.RedisError as exc:
        raise SinkError(error_kind(exc), f"Redis is not reachable: {exc}") from None

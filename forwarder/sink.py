"""The Redis writer: one thread that drains the spool into streams, idempotently and in order.

Each batch is one EVALSHA of `WRITE_BATCH`, a Lua script that skips entries whose offset is
at or below this writer's high-water mark, XADDs the rest, and advances the mark, atomically.
redis-py's own retries are turned off (they re-send applied writes: docs/library-notes.md
section 2.2); we retry ourselves, and a batch whose reply was lost (timeout, cut connection)
can be re-sent safely because the script never applies an offset twice.

Frames that are not a JSON object or array go to the subscription's dead-letter stream with
a reason, in the same batch, so nothing is lost and order within each stream is kept.
"""

from __future__ import annotations

import base64
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis
import orjson
import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from forwarder.config import RedisConfig
from forwarder.decode import invalid_reason
from forwarder.errors import SinkError
from forwarder.frames import Opcode, Oversized
from forwarder.spool import GAP, Batch, DiskSpool, Entry, Route
from forwarder.stats import SubscriptionStats, WriterStats

log = logging.getLogger(__name__)

TEXT = int(Opcode.TEXT)  # a plain int: compared once per frame

HWM_TTL_SECONDS = 7 * 24 * 3600
IDLE_PING_SECONDS = 5.0

# KEYS[1]: the high-water-mark key; KEYS[2..]: one per stream slot.
# ARGV[1]: hwm ttl; ARGV[2]: maxlen ('0' = none); ARGV[3]: the batch's last offset;
# ARGV[4]: the number of slots S, then S pairs (event, source) for KEYS[2..S+1]. Then per
# entry, either a frame, in 4 arguments (the hot path: few arguments to pack and parse):
#   offset, slot key index k > 1, received_at (ms), data
# or any other entry (dead letters, gap records):
#   offset, -k, trim flag (1/0), field count n, n field/value items.
# Returns {written, {offset, error, ...}} with the entries whose XADD failed, or
# {written, errors, offset, error} when it stopped at a configuration error (NOPERM,
# WRONGTYPE): that entry and the rest are left for a later retry, the mark says where.
# The `#!lua` line makes Redis 7 refuse the whole script up front under OOM, instead of
# failing half-way.
WRITE_BATCH = """#!lua
local hwm = tonumber(redis.call('GET', KEYS[1]) or '0')
local last = tonumber(ARGV[3])
if last <= hwm then
  return {0, {}}
end
-- Claim the batch first: if this SET is refused, nothing below has run.
redis.call('SET', KEYS[1], last, 'EX', ARGV[1])
local maxlen = ARGV[2]
local trim = maxlen ~= '0'
local written = 0
local errors = {}
local applied = hwm
local i = 5 + 2 * tonumber(ARGV[4])
while i <= #ARGV do
  local off = tonumber(ARGV[i])
  local k = tonumber(ARGV[i + 1])
  local r = nil
  local nexti
  if k > 0 then
    if off > hwm then
      local s = 1 + 2 * k
      if trim then
        r = redis.pcall('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*', 'data', ARGV[i + 3],
          'event', ARGV[s], 'source', ARGV[s + 1], 'received_at', ARGV[i + 2])
      else
        r = redis.pcall('XADD', KEYS[k], '*', 'data', ARGV[i + 3],
          'event', ARGV[s], 'source', ARGV[s + 1], 'received_at', ARGV[i + 2])
      end
    end
    nexti = i + 4
  else
    local n = tonumber(ARGV[i + 3])
    if off > hwm then
      local cmd = {'XADD', KEYS[-k]}
      if ARGV[i + 2] == '1' and trim then
        cmd[3] = 'MAXLEN'; cmd[4] = '~'; cmd[5] = maxlen
      end
      cmd[#cmd + 1] = '*'
      for j = 1, n do cmd[#cmd + 1] = ARGV[i + 3 + j] end
      r = redis.pcall(unpack(cmd))
    end
    nexti = i + 4 + n
  end
  if r ~= nil then
    if type(r) == 'table' and r.err then
      local e = r.err
      -- Redis 7.0 reports an ACL refusal inside a script as "ERR The user executing the
      -- script can't run this command" or "can't access ... keys", not as NOPERM.
      if string.sub(e, 1, 6) == 'NOPERM' or string.sub(e, 1, 9) == 'WRONGTYPE'
          or string.find(e, "can't run", 1, true) or string.find(e, "can't access", 1, true)
          or string.find(e, 'no permissions', 1, true) then
        redis.call('SET', KEYS[1], applied, 'EX', ARGV[1])
        return {written, errors, off, e}
      end
      errors[#errors + 1] = off
      errors[#errors + 1] = e
    else
      written = written + 1
    end
    applied = off
  end
  i = nexti
end
return {written, errors}
"""
CONFIG_ERROR_RETRY_SECONDS = 30.0
CONFIG_ERROR_KINDS = ("noperm", "wrongtype")


def error_kind(exc: BaseException) -> str:
    """Bounded class of a Redis error (the `kind` label of forwarder_redis_errors_total)."""
    # redis-py strips the error prefix (READONLY, OOM…) from the message and maps it to a
    # class; replies it does not map keep their prefix in the text.
    for cls, kind in (
        (rex.TimeoutError, "timeout"),
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
    ):
        if text.startswith(prefix):
            return kind
    return "other"


def make_client(config: RedisConfig) -> redis.Redis:
    """A Redis client with timeouts on and redis-py's automatic re-sends off.

    rediss://: TLS 1.2 or later, the server's certificate and host name always verified
    (against `ca_file` in addition to the system trust store: redis-py loads both), and a
    client certificate if configured; a failed TLS handshake is logged at ERROR.
    """
    tls: dict[str, Any] = {}
    if urlsplit(config.url).scheme == "rediss":
        tls = {
            "connection_class": _TLSConnection,
            "ssl_ca_certs": str(config.ca_file) if config.ca_file else None,
            "ssl_certfile": str(config.client_cert) if config.client_cert else None,
            "ssl_keyfile": str(config.client_key) if config.client_key else None,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }
    return redis.Redis.from_url(
        config.url,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **tls,
    )


TLS_ERROR_LOG_INTERVAL = 60.0  # seconds between two ERROR lines about a failing TLS handshake


class _TLSConnection(redis.SSLConnection):
    """redis-py's TLS connection; a failed handshake is a configuration problem (CA, host
    name, client certificate), not a passing outage, so it is also logged at ERROR (at most
    once a minute per connection: the pool reuses the connection object after a failure)."""

    _tls_error_logged_at = -TLS_ERROR_LOG_INTERVAL  # monotonic

    def _connect(self) -> socket.socket:
        try:
            sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        except ssl.SSLError as exc:
            now = time.monotonic()
            if now - self._tls_error_logged_at >= TLS_ERROR_LOG_INTERVAL:
                self._tls_error_logged_at = now
                why = (
                    f"the server's certificate was refused ({exc.verify_message}): check "
                    "redis.ca_file and that the host name in redis.url is one the "
                    "certificate names"
                    if isinstance(exc, ssl.SSLCertVerificationError)
                    else f"{exc}; if Redis requires a client certificate (tls-auth-clients), "
                    "set redis.client_cert"
                )
                log.error("Redis TLS handshake with %s:%s failed: %s", self.host, self.port, why)
            raise
        return sock


class RedisWriter:
    """Owns the writer thread. `start()` returns at once; `stop()` then `join()` to finish.

    Thread-safety: `start`, `stop`, `abandon`, `join` and the properties may be called from
    any thread; everything else runs on the writer thread.
    """

    def __init__(
        self,
        client: redis.Redis,
        spool: DiskSpool,
        stats: Sequence[SubscriptionStats],
        writer_stats: WriterStats,
        config: RedisConfig,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._spool = spool
        self._routes = spool.routes
        self._stats = stats  # by route index, like the spool's routes
        self._wstats = writer_stats
        self._config = config
        self._rand = rand
        self._hwm_key = f"forwarder:hwm:{spool.writer_id}"
        self._script = client.register_script(WRITE_BATCH)
        self._maxlen = str(config.maxlen or 0)
        self._thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        # Set by stop(): exit once the spool is empty or the deadline has passed.
        self._stopping = threading.Event()
        self._deadline = float("inf")  # monotonic; written by stop() before _stopping is set
        self._abandon = threading.Event()  # set by abandon(): give up at once
        self.failed: BaseException | None = None  # set if the thread died of a bug
        self.progress = 0  # incremented on every loop turn: the systemd watchdog's evidence
        self._last_errors: dict[int, str] = {}  # {offset: error} of the last batch

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
                self.progress += 1
                # Once stopping, do not wait for more: exit as soon as the spool is empty.
                timeout = 0.0 if self._stopping.is_set() else IDLE_PING_SECONDS
                batch = self._spool.peek(self._config.batch_max, timeout)
                if not batch:
                    if self._stopping.is_set():
                        return
                    self._idle_ping()
                    continue
                if not self._write(batch):
                    pending, _ = self._spool.pending()
                    log.warning(
                        "shutdown deadline reached with Redis unavailable: %d frames stay in "
                        "the spool and are written after the next start",
                        pending,
                    )
                    return
                self._spool.commit(batch)
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

    def _write(self, batch: Batch) -> bool:
        """Write one batch until Redis confirms it; False if the shutdown deadline passed."""
        keys, args, invalid = self._prepare(batch, {})
        while True:
            reply = self._call(self._hwm_key, keys, args, len(batch))
            if reply is None:
                return False
            stopped = _stopped_at(reply)
            if stopped is None:
                break
            # NOPERM or WRONGTYPE: only a human can fix it. Keep everything in the spool and
            # retry slowly; the entries Redis applied before the error are skipped next time.
            offset, error = stopped
            kind = error_kind(rex.ResponseError(error))
            self._wstats.errors[kind] = self._wstats.errors.get(kind, 0) + 1
            route = self._routes[dict(batch)[offset].subscription]
            self._spool.writer_ok(False)
            self._config_error(f"stream {route.stream!r}: {error}", len(batch))
            if self._wait(CONFIG_ERROR_RETRY_SECONDS):
                return False
        rejected = self._account(batch, invalid, reply)
        if rejected:
            return self._dead_letter_rejected(rejected)
        return True

    def _dead_letter_rejected(self, rejected: Batch) -> bool:
        """Send entries Redis refused one by one (e.g. too large for the server's limits) to
        the dead-letter stream with the error, instead of retrying them forever and blocking
        every other stream. Their own high-water mark keeps this idempotent too."""
        errors = dict(self._last_errors)
        keys, args, _ = self._prepare(rejected, errors)
        reply = self._call(self._hwm_key + ":rejected", keys, args, len(rejected))
        if reply is None:
            return False
        failed = _failures(reply)
        for offset, entry in rejected:
            stats = self._stats[entry.subscription]
            if offset in failed:
                log.error(
                    "a frame of %s/%s was refused by Redis (%s) and so was its dead-letter "
                    "entry (%s): it is lost",
                    stats.source,
                    stats.event,
                    errors.get(offset),
                    failed[offset],
                )
                stats.lost += 1
            else:
                stats.invalid["redis_rejected"] = stats.invalid.get("redis_rejected", 0) + 1
        return True

    def _call(
        self, hwm_key: str, keys: list[str], args: list[bytes | str | int], size: int
    ) -> object | None:
        """Run the script until Redis answers; None if the shutdown deadline passed."""
        failures = 0
        while True:
            try:
                reply: object = self._evalsha([hwm_key, *keys], args)
            except rex.RedisError as exc:
                self._spool.writer_ok(False)  # readers must not wait for us now
                kind = self._record_error(exc)
                failures += 1
                if kind in CONFIG_ERROR_KINDS:
                    # The whole script refused (EVALSHA not allowed, a key not allowed): a
                    # human must act. Loud, slow, and nothing leaves the spool meanwhile.
                    self._config_error(str(exc), size)
                    if self._wait(CONFIG_ERROR_RETRY_SECONDS):
                        return None
                    continue
                delay = min(5.0, 0.05 * 2.0**failures) * (0.5 + self._rand() / 2.0)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "Redis write failed (%s, attempt %d), %d frames kept in the spool; "
                        "retrying in %.2fs: %s",
                        kind,
                        failures,
                        size,
                        delay,
                        exc,
                    )
                if self._wait(delay):
                    return None
                continue
            self._wstats.last_ok_at = time.monotonic()
            self._wstats.config_error = None
            self._wstats.batches += 1
            self._spool.writer_ok(True)
            if failures:
                log.info("Redis writes recovered after %d failed attempts", failures)
            return reply

    def _config_error(self, error: str, size: int) -> None:
        self._wstats.config_error = error
        log.error(
            "Redis refuses our writes (%s): fix the key type or the ACL (see README, Redis "
            "ACL); %d frames and everything after them stay in the spool; retrying in %.0fs",
            error,
            size,
            CONFIG_ERROR_RETRY_SECONDS,
        )

    def _evalsha(self, keys: list[str], args: list[bytes | str | int]) -> object:
        """EVALSHA of WRITE_BATCH, packed by hiredis in one C call.

        redis-py's own packing walks every argument in Python (four per frame here): it was
        the writer's largest cost. Same connection pool, timeouts and errors as the client;
        a NOSCRIPT (a restarted or flushed Redis) loads the script and sends it again, which
        is safe: NOSCRIPT means nothing ran.
        """
        command = [
            hiredis.pack_command(
                ("EVALSHA", self._script.sha, len(keys), *keys, *args)  # type: ignore[arg-type]
            )
        ]
        for attempt in (1, 2):
            pool = self._client.connection_pool
            conn = pool.get_connection()
            try:
                conn.send_packed_command(command)  # type: ignore[no-untyped-call]
                return conn.read_response()
            except rex.NoScriptError:
                if attempt == 2:
                    raise
                self._client.script_load(WRITE_BATCH)
            except (rex.ConnectionError, rex.TimeoutError):
                conn.disconnect()  # type: ignore[no-untyped-call]  # never reuse it: a late reply
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")

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

    def _prepare(
        self, batch: Batch, rejected: dict[int, str]
    ) -> tuple[list[str], list[bytes | str | int], dict[int, str]]:
        """Script keys and arguments for a batch (see WRITE_BATCH); also {offset: reason}
        for the entries that go to a dead-letter stream. The per-frame hot path."""
        keys: list[str] = []
        slot_args: list[bytes | str | int] = []
        slots: dict[tuple[str, str, str], int] = {}
        entry_args: list[bytes | str | int] = []
        invalid: dict[int, str] = {}
        routes = self._routes
        for offset, entry in batch:
            route_index, opcode, payload, received_at = entry
            if (
                opcode == TEXT
                and type(payload) is bytes
                and offset not in rejected
                and invalid_reason(opcode, payload) is None
            ):
                route = routes[route_index]
                slot = (route.stream, route.event, route.source)
                k = slots.get(slot)
                if k is None:
                    keys.append(route.stream)
                    slot_args += (route.event, route.source)
                    k = slots[slot] = len(keys) + 1  # KEYS[1] is the high-water mark
                entry_args += (offset, k, int(received_at * 1000), payload)
                continue
            stream, trim, fields, reason = self._route(entry, rejected.get(offset))
            if reason is not None:
                invalid[offset] = reason
            slot = (stream, "", "")
            k = slots.get(slot)
            if k is None:
                keys.append(stream)
                slot_args += ("", "")
                k = slots[slot] = len(keys) + 1
            entry_args += (offset, -k, trim, len(fields), *fields)
        args: list[bytes | str | int] = [
            HWM_TTL_SECONDS,
            self._maxlen,
            batch[-1][0],
            len(keys),
            *slot_args,
            *entry_args,
        ]
        return keys, args, invalid

    def _route(
        self, entry: Entry, error: str | None
    ) -> tuple[str, str, list[bytes | str | int], str | None]:
        """Where an entry that is not a valid frame goes (valid frames take `_prepare`'s fast
        path): a gap record to the gap stream; anything else to the dead-letter stream, with
        its reason and, for an entry Redis refused once, the error.

        Returns (stream, trim flag, fields, dead-letter reason or None).
        """
        route = self._routes[entry.subscription]
        if error is None and entry.opcode == GAP:
            return self._config.gap_stream, "0", gap_fields(route, entry), None
        if error is not None:
            reason = "redis_rejected"
        else:
            # Never None here by construction; "unroutable" keeps the frame all the same.
            reason = invalid_reason(entry.opcode, entry.payload) or "unroutable"
        fields = dead_letter_fields(route, entry, reason, int(entry.received_at * 1000))
        if error is not None:
            fields += ["error", error]
        return route.dead_letter_stream, "0", fields, reason

    def _account(self, batch: Batch, invalid: dict[int, str], reply: object) -> Batch:
        """Update the counters; return the entries Redis refused (errors in _last_errors)."""
        failed = _failures(reply)
        self._last_errors = failed
        rejected: Batch = []
        now = time.time()
        for offset, entry in batch:
            stats = self._stats[entry.subscription]
            if offset in failed:
                rejected.append((offset, entry))
                continue
            if entry.opcode == GAP:
                stats.gaps_recorded += 1
                continue
            reason = invalid.get(offset)
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
    route: Route, entry: Entry, reason: str, received_ms: int
) -> list[bytes | str | int]:
    """The fields of a dead-letter entry: why, where from, and the raw bytes in base64."""
    payload = entry.payload
    fields: list[bytes | str | int] = [
        "reason",
        reason,
        "event",
        route.event,
        "source",
        route.source,
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


def gap_fields(route: Route, entry: Entry) -> list[bytes | str | int]:
    """The fields of a gap record: source, event, then the record's own (start, end, cause…)."""
    fields: list[bytes | str | int] = ["source", route.source, "event", route.event]
    try:
        record = orjson.loads(entry.payload) if isinstance(entry.payload, bytes) else {}
    except orjson.JSONDecodeError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    for key, value in record.items():
        fields += [str(key), value if isinstance(value, int | str) else orjson.dumps(value)]
    return fields


def _failures(reply: object) -> dict[int, str]:
    """{offset: error} of the entries whose XADD failed, from the script's reply."""
    failed: dict[int, str] = {}
    if isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], list):
        errs = reply[1]
        for k in range(0, len(errs) - 1, 2):
            failed[int(errs[k])] = _text(errs[k + 1])
    return failed


def _stopped_at(reply: object) -> tuple[int, str] | None:
    """(offset, error) where the script stopped at a configuration error, else None."""
    if isinstance(reply, list) and len(reply) == 4:
        return int(reply[2]), _text(reply[3])
    return None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_redis(client: redis.Redis) -> None:
    """One PING; raises SinkError with a bounded kind. Used by check-config and tests."""
    try:
        client.ping()
    except rex.RedisError as exc:
        raise SinkError(error_kind(exc), f"Redis is not reachable: {exc}") from None

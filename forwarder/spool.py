"""The durable hand-off between subscriber threads and the Redis writer.

Subscribers append what they received; nothing waits for Redis. Every entry is written to an
append-only segment file in the spool directory before `append` returns, and gets a
monotonically increasing *offset*. The single writer peeks a batch, writes it to Redis, and
only then commits it; the offsets make those writes idempotent (see sink.py), and the
committed offset is saved in `cursor`, so after a crash or a restart the writer resumes where
Redis confirmed, and Redis skips whatever it had already applied.

Durability: `append` hands the bytes to the kernel with one `write` per chunk of frames, so a
crash of the process (kill -9, OOM kill) loses nothing that was appended. A crash of the
machine loses at most `fsync_interval` (default 0.2 s) of frames: a flusher thread fsyncs the
active segment that often.

Memory: recent entries are also kept in a bounded in-memory cache so that, while Redis keeps
up, the writer never reads the disk. When the cache is full (Redis slow or down), new entries
are on disk only and the writer reads them back from the segment files, in order.

On-disk format, one record per entry (little-endian):
    magic b"FWS1" | u32 length of what follows the crc | u32 crc32(body + offset)
    | body: f64 received_at | u16 opcode | u16 key length | key | payload
    | u64 offset
where key is "source\\0event\\0stream\\0dead-letter stream", so a record can be written even
after its subscription left the configuration. Oversized frames store a JSON description
(size, sha256, head in base64) with the OVERSIZED flag set in the opcode. Segment files are
named after their first offset; a torn or corrupt record is detected by its crc, counted, and
skipped (a torn tail is truncated at start-up).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson

from forwarder.errors import ForwarderError
from forwarder.frames import Oversized

log = logging.getLogger(__name__)

# An internal opcode (outside RFC 6455's 4 bits) for a gap record: an interval in which a
# subscription was not receiving. Its payload is a JSON object of the record's fields; the
# writer appends it to the gap stream, ordered with the frames of its subscription.
GAP = 0x100
_OVERSIZED_FLAG = 0x8000

MAGIC = b"FWS1"
_HEAD = struct.Struct("<4sII")  # magic, length (body + offset), crc
_BODY = struct.Struct("<dHH")  # received_at, opcode, key length
_OFFSET = struct.Struct("<Q")
SEGMENT_SUFFIX = ".seg"
_READ_CHUNK = 1 << 20  # bytes read from a segment at a time when replaying a backlog


class Entry(NamedTuple):
    """One received frame (or a GAP record), as the subscriber saw it."""

    subscription: int  # index into the spool's routes (the daemon's subscription list first)
    opcode: int
    payload: bytes | Oversized
    received_at: float  # unix time


Batch = list[tuple[int, Entry]]  # (offset, entry), offsets increasing


@dataclass(frozen=True)
class Route:
    """Where a subscription's entries go; stored in every record."""

    source: str
    event: str
    stream: str
    dead_letter_stream: str

    def key(self) -> bytes:
        return "\0".join((self.source, self.event, self.stream, self.dead_letter_stream)).encode()


class SpoolError(ForwarderError):
    """The spool directory cannot be used (permissions, disk, another process holds it)."""


def _oversized_json(payload: Oversized) -> bytes:
    """What a record stores for an oversized frame: its size, hash and head."""
    return orjson.dumps(
        {
            "size": payload.size,
            "sha256": payload.sha256,
            "head": base64.b64encode(payload.head).decode(),
            "opcode": payload.opcode,
        }
    )


def entry_size(entry: Entry) -> int:
    payload = entry.payload
    return len(payload) if isinstance(payload, bytes) else len(payload.head)


@dataclass
class SpoolStats:
    """Counters of the spool. Fields are written under the spool lock or by the writer."""

    appended: int = 0
    committed: int = 0
    rejected_full: int = 0  # entries refused because the spool was at max_bytes
    corrupt_records: int = 0  # records skipped because their crc or framing was wrong
    corrupt_bytes: int = 0
    disk_reads: int = 0  # batches the writer had to read back from disk
    fsyncs: int = 0
    write_errors: int = 0


class DiskSpool:
    """Segment files plus an in-memory cache. Thread-safe: many producers, one consumer.

    `append` never blocks on Redis and only briefly on the spool lock; `peek`/`commit` are
    for the single writer thread. `start()` launches the fsync thread; `close()` stops it and
    syncs everything.
    """

    def __init__(
        self,
        directory: Path,
        routes: Sequence[Route],
        max_bytes: int,
        fsync_interval: float = 0.2,
        segment_bytes: int = 64 * 1024 * 1024,
        cache_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
        backlog_entries: int = 20_000,
    ) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._fsync_interval = fsync_interval
        # Segments are deleted whole, so keep them small next to max_bytes.
        self._segment_bytes = min(segment_bytes, max(1 << 20, max_bytes // 8))
        self._cache_limit = cache_bytes
        self._backlog = backlog_entries  # see wait_for_writer()
        # Set by the writer: False while Redis fails or refuses writes. Readers are held back
        # only while it is True: during an outage they must keep reading into the spool.
        self._writer_ok = True
        self._readers_waiting = 0
        self._clock = clock
        self.stats = SpoolStats()
        self._cond = threading.Condition(threading.Lock())
        self._routes: list[Route] = list(routes)
        self._route_index: dict[bytes, int] = {r.key(): i for i, r in enumerate(self._routes)}
        self._route_keys: list[bytes] = [r.key() for r in self._routes]
        # Per-route pending counts: entries appended (or recovered) and not yet committed.
        self.pending_by_route: list[int] = [0] * len(self._routes)
        self._lock_file = self._open_dir()
        self.writer_id = self._read_writer_id()
        # Segments on disk: first offset -> path, in order. Guarded by _cond.
        self._segments: dict[int, Path] = {}
        self._segment_sizes: dict[int, int] = {}
        self._committed = self._read_cursor()
        self._next_offset = self._committed + 1
        self._pending = 0  # entries after the committed offset
        self._pending_bytes = 0  # payload bytes of those
        self._pending_disk = 0  # on-disk bytes of their records: what max_bytes limits
        self._refusing = False  # full, and Redis has confirmed nothing since (see append)
        self._refused_at = 0  # the committed offset when the refusing began
        self._recover()
        # The active segment (append side).
        self._fd = -1
        self._active_first = 0
        self._active_size = 0
        self._dirty = False
        # The cache: a contiguous run of the newest entries,
        # (offset, entry, payload size, segment of the record, end of the record in it,
        # record size).
        self._cache: deque[tuple[int, Entry, int, int, int, int]] = deque()
        self._cache_size = 0
        self._caching = self._pending == 0  # otherwise the backlog is read from disk first
        # Read side (writer thread only): next record to read from disk.
        self._read_first = 0  # first offset of the segment being read
        self._read_pos = 0  # byte position in it
        self._peeked_ends: list[tuple[int, int]] = []  # (segment, position) after each entry
        self._peeked_sizes: list[int] = []
        self._peeked_records: list[int] = []  # on-disk record sizes of the last peek
        self._cursor_saved = self._committed
        self.oldest_received_at: float | None = None
        self._flusher = threading.Thread(target=self._flush_loop, name="spool-fsync", daemon=True)
        self._stop = threading.Event()

    # -- set-up ---------------------------------------------------------------------------

    def _open_dir(self) -> int:
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool.dir {self._dir}: cannot use it: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"spool.dir {self._dir}: another forwarder process is using it "
                "(two processes must not share a spool)"
            ) from None
        return fd

    def _read_writer_id(self) -> str:
        """A stable identity for this spool: the name of its high-water mark in Redis."""
        path = self._dir / "writer-id"
        try:
            text = path.read_text().strip()
            if text:
                return text
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolError(f"{path}: {exc.strerror}") from None
        value = uuid.uuid4().hex
        self._write_atomic(path, value.encode())
        return value

    def _read_cursor(self) -> int:
        try:
            return int((self._dir / "cursor").read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.error("spool cursor unreadable (%s): replaying the whole spool", exc)
            return 0

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _recover(self) -> None:
        """Scan the segments: drop fully committed ones, count what is pending, cut torn tails."""
        firsts = sorted(
            int(p.name[: -len(SEGMENT_SUFFIX)])
            for p in self._dir.glob("*" + SEGMENT_SUFFIX)
            if p.name[: -len(SEGMENT_SUFFIX)].isdigit()
        )
        last_offset = self._committed
        for i, first in enumerate(firsts):
            path = self._segment_path(first)
            data = path.read_bytes()
            records, good_end = self._scan(data)
            if good_end < len(data) and i == len(firsts) - 1:
                # A torn tail (the process died mid-write): cut it so appends continue cleanly.
                log.warning(
                    "spool: cutting %d bytes of a torn record at the end of %s",
                    len(data) - good_end,
                    path.name,
                )
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                data = data[:good_end]
            max_offset = records[-1][0] if records else first - 1
            if max_offset <= self._committed and i < len(firsts) - 1:
                path.unlink()  # everything in it was confirmed by Redis
                continue
            self._segments[first] = path
            self._segment_sizes[first] = len(data)
            for offset, route, size, record_size in records:
                if offset > self._committed:
                    self._pending += 1
                    self._pending_bytes += size
                    self._pending_disk += record_size
                    self.pending_by_route[route] += 1
            last_offset = max(last_offset, max_offset)
        self._next_offset = last_offset + 1
        if self._pending:
            log.info(
                "spool: %d frames (%d bytes) from a previous run will be written to Redis",
                self._pending,
                self._pending_bytes,
            )

    def _route_for_key(self, key: bytes) -> int:
        index = self._route_index.get(key)
        if index is None:
            parts = key.decode("utf-8", "replace").split("\0")
            if len(parts) != 4:  # not ours or damaged beyond its crc: keep the frame anyway
                defaults = ["?", "?", "forwarder:orphans", "forwarder:orphans:dlq"]
                parts = parts[:4] + defaults[len(parts) :]
            route = Route(*parts)
            index = len(self._routes)
            self._routes.append(route)
            self._route_keys.append(key)
            self._route_index[key] = index
            self.pending_by_route.append(0)
            log.warning(
                "spool: frames of %s/%s (no longer configured) will still be written to %r",
                route.source,
                route.event,
                route.stream,
            )
        return index

    def add_route(self, route: Route) -> int:
        """The index of `route`, registering it if new (a subscription added by a reload)."""
        key = route.key()
        with self._cond:
            index = self._route_index.get(key)
            if index is None:
                index = len(self._routes)
                self._routes.append(route)
                self._route_keys.append(key)
                self._route_index[key] = index
                self.pending_by_route.append(0)
            return index

    @property
    def routes(self) -> list[Route]:
        """Routes by index: the configured subscriptions first, then any found on disk."""
        return self._routes

    def _segment_path(self, first: int) -> Path:
        return self._dir / f"{first:020d}{SEGMENT_SUFFIX}"

    def start(self) -> None:
        self._flusher.start()

    # -- append side (subscriber threads) ----------------------------------------------------

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        """Persist a chunk of entries (one `write`); False if the spool is full (none stored).

        Non-blocking apart from the spool lock and one write to the page cache. This is the
        per-frame hot path: the record prefix (time, opcode, route key) and its crc are
        computed once per chunk, and each frame costs two C-level crc32 calls and a join.
        """
        # Outside the lock: each record's body (prefix + payload) and the crc of it; the
        # offset, which the lock assigns, is appended to both after.
        prefixes: dict[tuple[int, int, float], tuple[bytes, int]] = {}
        bodies: list[tuple[bytes, bytes, int, int]] = []  # (prefix, payload, crc, size)
        routes: dict[int, int] = {}
        incoming = 0
        for entry in entries:
            route, opcode, payload, received_at = entry
            if type(payload) is not bytes:
                assert isinstance(payload, Oversized)
                size = len(payload.head)
                payload = _oversized_json(payload)
                opcode |= _OVERSIZED_FLAG
            else:
                size = len(payload)
            cached = prefixes.get((route, opcode, received_at))
            if cached is None:
                key = self._route_keys[route]
                prefix = _BODY.pack(received_at, opcode, len(key)) + key
                cached = prefixes[route, opcode, received_at] = (prefix, zlib.crc32(prefix))
            prefix, prefix_crc = cached
            bodies.append((prefix, payload, zlib.crc32(payload, prefix_crc), size))
            routes[route] = routes.get(route, 0) + 1
            incoming += _HEAD.size + len(prefix) + len(payload) + 8
        with self._cond:
            # Keep the oldest: what is spooled stays until Redis confirms it. Once full, keep
            # refusing until Redis confirms something, so an outage makes one contiguous gap
            # rather than holes wherever a smaller chunk happened to fit.
            stuck = self._refusing and self._committed == self._refused_at
            if stuck or (self._pending and self._pending_disk + incoming > self._max_bytes):
                if not self._refusing:
                    self._refusing = True
                    self._refused_at = self._committed
                self.stats.rejected_full += len(entries)
                return False
            self._refusing = False
            parts: list[bytes] = []
            first = offset = self._next_offset
            head_pack = _HEAD.pack
            offset_pack = _OFFSET.pack
            crc32 = zlib.crc32
            for prefix, payload, crc, _ in bodies:
                offset_bytes = offset_pack(offset)
                record_length = len(prefix) + len(payload) + 8
                parts += (
                    head_pack(MAGIC, record_length, crc32(offset_bytes, crc)),
                    prefix,
                    payload,
                    offset_bytes,
                )
                offset += 1
            data = b"".join(parts)
            try:
                self._write(first, data)
            except OSError as exc:
                self.stats.write_errors += 1
                log.error("spool: cannot write to %s: %s", self._dir, exc.strerror)
                return False
            self._next_offset = offset
            self._pending += len(entries)
            self._pending_bytes += nbytes
            self._pending_disk += len(data)
            self.stats.appended += len(entries)
            for route, count in routes.items():
                self.pending_by_route[route] += count
            if self._caching:
                if self._cache_size + nbytes <= self._cache_limit:
                    # Remember where each record ends on disk, so that committing cached
                    # entries also moves the disk read position past them.
                    segment = self._active_first
                    end = self._active_size - len(data)
                    cache_append = self._cache.append
                    for n, entry in enumerate(entries):
                        prefix, payload, _, size = bodies[n]
                        record_size = _HEAD.size + len(prefix) + len(payload) + 8
                        end += record_size
                        cache_append((first + n, entry, size, segment, end, record_size))
                    self._cache_size += nbytes
                else:
                    # From here on the writer reads these from disk, until it catches up.
                    self._caching = False
            if self._pending == len(entries):  # it was empty: the writer may be waiting
                self._cond.notify()
        return True

    def _write(self, first: int, data: bytes) -> None:
        if self._fd < 0 or self._active_size >= self._segment_bytes:
            self._rotate(first)
        written = os.write(self._fd, data)
        while written < len(data):  # a short write (disk almost full, signal): finish it
            written += os.write(self._fd, data[written:])
        self._active_size += len(data)
        self._segment_sizes[self._active_first] = self._active_size
        self._dirty = True

    def _rotate(self, first: int) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._segments:
            last_first = max(self._segments)
            if self._segment_sizes.get(last_first, 0) < self._segment_bytes:
                # Keep appending to the last segment of a previous run (after its torn tail
                # was cut) rather than starting a nearly empty one.
                first = last_first
        path = self._segment_path(first)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active_first = first
        self._active_size = os.fstat(self._fd).st_size
        if first not in self._segments:
            self._segments[first] = path
            self._segment_sizes[first] = self._active_size
            dir_fd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new file's name survives a power cut
            finally:
                os.close(dir_fd)

    def _disk_bytes(self) -> int:
        return sum(self._segment_sizes.values())

    # -- read side (the writer thread) ----------------------------------------------------

    def peek(self, max_entries: int, timeout: float) -> Batch:
        """Wait up to `timeout` for entries; return up to `max_entries` uncommitted ones.

        Writer thread only. The entries stay in the spool until `commit`.
        """
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            if not self._pending:
                self.oldest_received_at = None
                return []
            first_wanted = self._committed + 1
            cache = self._cache
            # Cached entries older than the commit point can be left by a disk read-back.
            while cache and cache[0][0] < first_wanted:
                self._cache_size -= cache.popleft()[2]
            if cache and cache[0][0] == first_wanted:
                take = min(max_entries, len(cache))
                cached = [cache[i] for i in range(take)]
                self._peeked_sizes = [c[2] for c in cached]
                self._peeked_ends = [(c[3], c[4]) for c in cached]
                self._peeked_records = [c[5] for c in cached]
                self.oldest_received_at = cached[0][1].received_at
                return [(c[0], c[1]) for c in cached]
        batch = self._read_disk(max_entries)
        if batch:
            self.oldest_received_at = batch[0][1].received_at
        return batch

    def _read_disk(self, max_entries: int) -> Batch:
        """Read the next uncommitted records from the segment files (writer thread)."""
        self.stats.disk_reads += 1
        batch: Batch = []
        self._peeked_ends = []
        self._peeked_sizes = []
        self._peeked_records = []
        with self._cond:
            firsts = sorted(self._segments)
        if not firsts:
            return batch
        if self._read_first not in self._segments:
            self._read_first, self._read_pos = firsts[0], 0
        for first in firsts:
            if first < self._read_first:
                continue
            pos = self._read_pos if first == self._read_first else 0
            with open(self._segment_path(first), "rb") as f:
                f.seek(pos)
                data = f.read(_READ_CHUNK)
                base = pos  # file position of data[0]
                i = 0
                while len(batch) < max_entries:
                    record = self._decode(data, i)
                    if record is None:  # need more bytes (or the end of the segment)
                        more = f.read(max(_READ_CHUNK, self._record_length(data, i)))
                        if not more:
                            break
                        data = data[i:] + more
                        base += i
                        i = 0
                        continue
                    if isinstance(record, int):
                        i = record  # skipped corrupt bytes
                        continue
                    offset, entry, size, end = record
                    if offset > self._committed:
                        batch.append((offset, entry))
                        self._peeked_ends.append((first, base + end))
                        self._peeked_sizes.append(size)
                        self._peeked_records.append(end - i)
                    i = end
            if len(batch) >= max_entries:
                break
        return batch

    @staticmethod
    def _record_length(data: bytes, pos: int) -> int:
        if len(data) - pos < _HEAD.size:
            return _HEAD.size
        return int(_HEAD.unpack_from(data, pos)[1]) + _HEAD.size

    def _decode(
        self, data: bytes, pos: int, count: bool = True
    ) -> tuple[int, Entry, int, int] | int | None:
        """The record at `pos`: (offset, entry, size, end); an int to skip to; None at the end.

        `count`: count and log skipped corrupt bytes (the read path); not at start-up, which
        reads the same bytes again later."""
        if len(data) - pos < _HEAD.size:
            return None
        magic, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic == MAGIC and length >= _BODY.size + 8 and end > len(data):
            return None  # incomplete here: read more (or it is being appended right now)
        if magic != MAGIC or length < _BODY.size + 8:
            return self._resync(data, pos, count)
        record = data[pos + _HEAD.size : end]
        if zlib.crc32(record) != crc:
            return self._resync(data, pos, count)
        received_at, opcode, key_len = _BODY.unpack_from(record, 0)
        key = record[_BODY.size : _BODY.size + key_len]
        raw = record[_BODY.size + key_len : -8]
        (offset,) = _OFFSET.unpack_from(record, len(record) - 8)
        with self._cond:
            route = self._route_for_key(key)
        payload: bytes | Oversized = raw
        if opcode & _OVERSIZED_FLAG:
            opcode &= ~_OVERSIZED_FLAG
            info = orjson.loads(raw)
            payload = Oversized(
                int(info["opcode"]),
                int(info["size"]),
                base64.b64decode(info["head"]),
                info["sha256"],
            )
        entry = Entry(route, opcode, payload, received_at)
        return offset, entry, entry_size(entry), end

    def _resync(self, data: bytes, pos: int, count: bool) -> int:
        """Skip a corrupt record: move to the next MAGIC (counted; never fatal)."""
        nxt = data.find(MAGIC, pos + 1)
        skipped = (nxt if nxt >= 0 else len(data)) - pos
        if not count:
            return nxt if nxt >= 0 else len(data)
        self.stats.corrupt_records += 1
        self.stats.corrupt_bytes += skipped
        log.error("spool: skipped %d corrupt bytes (crc or framing mismatch)", skipped)
        return nxt if nxt >= 0 else len(data)

    def commit(self, batch: Batch) -> None:
        """Mark `batch` (the last peek, or a prefix of it) as written. Writer thread only."""
        if not batch:
            return
        count = len(batch)
        last_offset = batch[-1][0]
        nbytes = sum(self._peeked_sizes[:count])
        with self._cond:
            cache = self._cache
            while cache and cache[0][0] <= last_offset:
                self._cache_size -= cache.popleft()[2]
            self._committed = last_offset
            self._pending -= count
            if self._readers_waiting and self._pending <= self._backlog // 2:
                self._cond.notify_all()
            self._pending_bytes -= nbytes
            self._pending_disk -= sum(self._peeked_records[:count])
            for _, entry in batch:
                self.pending_by_route[entry.subscription] -= 1
            self.stats.committed += count
            self._read_first, self._read_pos = self._peeked_ends[count - 1]
            if not self._caching and not self._pending:
                self._caching = True  # caught up: new entries go through memory again
            done = [
                first
                for first in sorted(self._segments)
                if first != self._active_first and self._segment_done(first, last_offset)
            ]
            if (
                not self._pending
                and self._fd >= 0
                and self._active_size >= self._segment_bytes // 4
            ):
                # Everything is confirmed: retire the active segment too, so the disk use
                # falls back instead of waiting for the segment to fill up.
                os.close(self._fd)
                self._fd = -1
                done.append(self._active_first)
            for first in done:
                self._segments.pop(first)
                self._segment_sizes.pop(first, None)
        for first in done:
            with contextlib.suppress(FileNotFoundError):
                self._segment_path(first).unlink()

    def _segment_done(self, first: int, committed: int) -> bool:
        """A segment is done when the next segment starts at or below the committed offset."""
        later = [f for f in self._segments if f > first]
        return bool(later) and min(later) <= committed + 1

    def wake(self) -> None:
        """Make a waiting `peek` return now (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def writer_ok(self, ok: bool) -> None:
        """The writer reports whether Redis takes its writes (writer thread)."""
        if ok != self._writer_ok:
            with self._cond:
                self._writer_ok = ok
                if not ok:
                    self._cond.notify_all()  # an outage: release any reader held back

    def wait_for_writer(self, timeout: float) -> None:
        """Hold a reader back, at most `timeout`, while the writer is behind but healthy.

        With one interpreter lock, a dozen busy readers can take it from the single writer
        and pile frames up faster than Redis is fed. While Redis takes writes, holding the
        readers back lets the writer catch up; the next frames wait in the socket buffers.
        During an outage (writer not ok) this never waits: frames go to the spool on disk.
        """
        if self._pending <= self._backlog or not self._writer_ok:
            return
        deadline = self._clock() + timeout
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._pending > self._backlog // 2 and self._writer_ok:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        return
                    self._cond.wait(remaining)
            finally:
                self._readers_waiting -= 1

    def pending(self) -> tuple[int, int]:
        """(entries, payload bytes) not yet committed. Thread-safe snapshot."""
        return self._pending, self._pending_bytes

    def disk_bytes(self) -> int:
        with self._cond:
            return self._disk_bytes()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    # -- durability -------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._fsync_interval):
            self.flush()

    def flush(self) -> None:
        """fsync the active segment and save the cursor if they changed. Any thread."""
        with self._cond:
            fd = self._fd if self._dirty else -1
            self._dirty = False
            committed = self._committed
        if fd >= 0:
            try:
                os.fsync(fd)
                self.stats.fsyncs += 1
            except OSError as exc:  # closed by a rotation meanwhile, or an I/O error
                if exc.errno != 9:
                    self.stats.write_errors += 1
                    log.error("spool: fsync failed: %s", exc.strerror)
        if committed != self._cursor_saved:
            try:
                self._write_atomic(self._dir / "cursor", str(committed).encode())
                self._cursor_saved = committed
            except OSError as exc:
                log.error("spool: cannot save the cursor: %s", exc.strerror)

    def close(self) -> None:
        """Stop the fsync thread, sync and close. Idempotent."""
        self._stop.set()
        if self._flusher.is_alive():
            self._flusher.join(5.0)
        self.flush()
        with self._cond:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if self._lock_file >= 0:
            os.close(self._lock_file)
            self._lock_file = -1

    def _scan(self, data: bytes) -> tuple[list[tuple[int, int, int, int]], int]:
        """Parse a whole segment at start-up: [(offset, route, payload size, record size)]
        and the end of the last good record. Corrupt records are skipped uncounted here: the
        writer counts them when it reads past them."""
        records: list[tuple[int, int, int, int]] = []
        pos = 0
        good_end = 0
        while True:
            record = self._decode(data, pos, count=False)
            if record is None:  # the end, or a torn record at the end
                return records, good_end
            if isinstance(record, int):
                pos = record
                continue
            offset, entry, size, end = record
            records.append((offset, entry.subscription, size, end - pos))
            pos = good_end = end


__all__ = [
    "GAP",
    "Batch",
    "DiskSpool",
    "Entry",
    "Route",
    "SpoolError",
    "SpoolStats",
    "entry_size",
]

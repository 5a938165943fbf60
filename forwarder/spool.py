"""The durable hand-off between subscriber threads and the Redis writer.

Subscribers append what they received; nothing waits for Redis. Every entry gets a
monotonically increasing *offset* and is written to an append-only segment file in the spool
directory before `append` returns. The single writer peeks a batch, writes it to Redis, and
only then commits it; the offsets make those writes idempotent (see sink.py), and the
committed offset is saved, so after a crash or a restart the writer resumes where Redis
confirmed, and Redis skips whatever it had already applied.

Durability: `append` hands the bytes to the kernel with one `write` per chunk of frames, so a
crash of the process (kill -9, OOM kill) loses nothing that was appended. A crash of the
machine loses at most `fsync_interval` (default 0.2 s) of frames: a flusher thread fsyncs the
active segment that often. Offsets stay monotonic across such a crash: they are handed out
below a floor saved durably ahead of use (spool_state.py), so a lost tail never makes the
next run reuse offsets that Redis has already applied.

Memory: recent entries are also kept in a bounded in-memory cache (`memory_bytes`) so that,
while Redis keeps up, the writer never reads the disk. When the cache is full (Redis slow or
down), new entries are on disk only and the writer reads them back from the segment files.

When the disk cannot take a chunk (no space, I/O error, directory gone), it is kept in the
cache only, *memory-only*: still written to Redis, but lost if the process dies before
Redis confirms it; counted, and written to disk as soon as the disk takes writes again
(before anything newer, so files stay in offset order). Only when memory is used up too, or
the spool is at `max_bytes` while Redis is unavailable, is a chunk refused (dropped). Space
is reclaimed as soon as Redis confirms: segments are small next to the filesystem and
`max_bytes`, and retired the moment every record in them is confirmed.

A flusher thread also checks every second that the directory and its files are still the
ones we wrote (an `rm -rf`, a tmpfiles cleaner); if not, it recreates them, writes back what
is still in memory, and counts what was only on disk as lost (spool_recovery.py).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder.spool_core import Cached, SpoolStats
from forwarder.spool_reader import ReaderMixin
from forwarder.spool_records import (
    GAP,
    RECORD_OVERHEAD,
    Batch,
    Entry,
    Route,
    encode,
    entry_size,
    pack,
    scan,
)
from forwarder.spool_recovery import RecoveryMixin
from forwarder.spool_segments import SEGMENT_SUFFIX, SegmentFiles, SegmentWriteError
from forwarder.spool_state import SpoolError, SpoolState, describe_filesystem, filesystem_bytes

log = logging.getLogger(__name__)

OFFSET_BLOCK = 1 << 20  # offsets reserved by one save of the floor (~10 s at 100k frames/s)
CHECK_INTERVAL = 1.0  # seconds between two checks that the directory is still ours
MIN_SEGMENT = 64 * 1024


class DiskSpool(ReaderMixin, RecoveryMixin):
    """Segment files plus an in-memory cache. Thread-safe: many producers, one consumer.

    `append` never blocks on Redis and only briefly on the spool lock; `peek`/`commit` are
    for the single writer thread. `start()` launches the flusher thread (fsync, state,
    directory checks); `close()` stops it and syncs everything.

    Locks: `_cond` (the spool lock) guards the books; `_read_lock` is held by the writer
    while it peeks or commits and by a recovery, which rewrites where entries are; when both
    are taken, `_read_lock` first.
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
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._fsync_interval = fsync_interval
        self._check_interval = check_interval
        self._cache_limit = cache_bytes
        self._backlog = backlog_entries  # see wait_for_writer()
        # Set by the writer: False while Redis fails or refuses writes. Readers are held back
        # only while it is True: during an outage they must keep reading into the spool.
        self._writer_ok = True
        # True once the writer's last call succeeded: a full spool (max_bytes) may then pass
        # chunks through memory, since Redis is taking them.
        self._redis_ok = False
        self._readers_waiting = 0
        self._clock = clock
        self.stats = SpoolStats()
        self._cond = threading.Condition(threading.Lock())
        self._read_lock = threading.RLock()
        self._routes: list[Route] = list(routes)
        self._route_index: dict[bytes, int] = {r.key(): i for i, r in enumerate(self._routes)}
        self._route_keys: list[bytes] = [r.key() for r in self._routes]
        # Per-route pending counts: entries appended (or recovered) and not yet committed.
        self.pending_by_route: list[int] = [0] * len(self._routes)
        self._state = SpoolState(directory)
        self.writer_id = self._state.writer_id
        self._committed = self._state.cursor
        self._next_offset = self._committed + 1
        self._pending = 0  # entries after the committed offset
        self._pending_bytes = 0  # payload bytes of those
        self._pending_disk = 0  # on-disk bytes of their records: what max_bytes limits
        self._memory_only = 0  # pending entries that are in memory only
        self._memory_only_bytes = 0
        self._refusing = False  # full, and Redis has confirmed nothing since (see append)
        self._refused_at = 0  # the committed offset when the refusing began
        self._memory_full = False
        self._writable = True
        self._write_problem = None
        self._disk_retry_at = 0.0
        self._loss_at = None
        self._loss_problem = None
        self._last_log = {}  # kind -> clock() of the last such ERROR line
        try:
            fs_size = filesystem_bytes(directory)
            # Segments are retired whole: keep them small next to max_bytes and the disk.
            self._segments = SegmentFiles(
                directory,
                min(segment_bytes, max(1 << 20, max_bytes // 8), max(MIN_SEGMENT, fs_size // 32)),
            )
            self._recover()
            self._next_offset = max(self._next_offset, self._state.floor)
            # Reserve the first block before any append: offsets below the floor are safe.
            self._state.save(cursor=self._committed, floor=self._next_offset + OFFSET_BLOCK)
        except OSError as exc:
            self._state.close()
            raise SpoolError(
                f"spool.dir {directory}: cannot start: {exc.strerror} "
                f"({describe_filesystem(directory)})"
            ) from None
        self._floor = self._state.floor
        self._cache: deque[Cached] = deque()
        self._cache_size = 0
        self._caching = self._pending == 0  # otherwise the backlog is read from disk first
        # Read side (writer thread): the next record to read from disk, and the last peek.
        self._read_first = -1  # the segment being read (-1: the first one)
        self._read_pos = 0  # byte position in it
        self._peeked: Batch = []
        self._peeked_ends: list[tuple[int, int]] = []  # (segment, position) after each entry
        self._peeked_sizes: list[int] = []
        self._peeked_records: list[int] = []  # on-disk record sizes (0: memory-only)
        self.oldest_received_at: float | None = None
        self._flusher = threading.Thread(target=self._flush_loop, name="spool-fsync", daemon=True)
        self._stop = threading.Event()
        self._check_at = 0.0
        self._closed = False
        self.failed: BaseException | None = None  # set if the flusher thread died of a bug

    # -- set-up ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """Scan the segments: drop fully committed ones, count what is pending, cut torn tails."""
        firsts = self._segments.on_disk()
        seen = self._committed  # records must come in increasing offsets: skip any other
        last_offset = self._committed
        for i, first in enumerate(firsts):
            path = self._segments.path(first)
            data = path.read_bytes()
            records, good_end = scan(data)
            last = i == len(firsts) - 1
            if good_end < len(data) and last:
                # A torn tail (the process died mid-write): cut it so appends continue cleanly.
                log.warning(
                    "spool: cutting %d bytes of a torn record at the end of %s",
                    len(data) - good_end,
                    path.name,
                )
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                data = data[:good_end]
            max_offset = max((r.offset for r in records), default=first - 1)
            last_offset = max(last_offset, max_offset)
            if max_offset <= self._committed:
                path.unlink()  # everything in it was confirmed by Redis
                continue
            self._segments.adopt(first, len(data), last)
            for r in records:
                if r.offset > seen:
                    seen = r.offset
                    self._pending += 1
                    self._pending_bytes += r.size
                    self._pending_disk += r.end - r.start
                    self.pending_by_route[self._route_for_key(r.key)] += 1
        self._next_offset = last_offset + 1
        if self._pending:
            log.info(
                "spool: %d frames (%d bytes) from a previous run will be written to Redis",
                self._pending,
                self._pending_bytes,
            )

    def start(self) -> None:
        self._flusher.start()

    def ensure_offsets_above(self, offset: int) -> None:
        """Hand out only offsets above `offset` from now on (e.g. a high-water mark Redis
        holds for this spool). Call before the first append: entries already spooled keep
        their offsets. Raises SpoolError if the floor cannot be saved."""
        with self._cond:
            if self._next_offset > offset:
                return
            self._next_offset = offset + 1
            if not self._extend_floor(self._next_offset):
                raise SpoolError(f"spool.dir {self._dir}: {self._write_problem}")

    # -- append side (subscriber threads) ----------------------------------------------------

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        """Take a chunk of entries; False if it was refused (none taken: the caller counts
        them as dropped; the spool has logged why).

        Non-blocking apart from the spool lock and one write to the page cache. This is the
        per-frame hot path: the record prefix (time, opcode, route key) and its crc are
        computed once per chunk, and each frame costs two C-level crc32 calls and a join.
        True means on disk, or, if the disk cannot take it, in memory (see the module doc).
        """
        bodies, routes, incoming = encode(entries, self._route_keys)  # outside the lock
        count = len(entries)
        with self._cond:
            first = self._next_offset
            if first + count > self._floor and not self._extend_floor(first + count):
                return self._refuse(entries, "write_error")
            reason = self._disk_refusal(incoming)
            if reason is None and self._memory_only and not self._persist_memory_only():
                reason = "write_error"  # the older memory-only entries must go first
            data: bytes | None = None
            dirty = False
            if reason is None:
                data = pack(bodies, range(first, first + count))
                try:
                    segment, start = self._segments.write(first, data)
                except SegmentWriteError as exc:
                    self._write_failed(exc.error, "a segment file")
                    dirty = exc.dirty
                    data = None
                    reason = "write_error"
            if reason is not None:
                if not self._memory_room(nbytes, reason):
                    if dirty:  # part of it may be on disk: never give these offsets to others
                        self._next_offset = first + count
                    return self._refuse(entries, reason)
            elif not self._writable:
                self._write_recovered()
            self._next_offset = first + count
            self._pending += count
            self._pending_bytes += nbytes
            self.stats.appended += count
            for route, n in routes.items():
                self.pending_by_route[route] += n
            cache_append = self._cache.append
            if data is None:
                self._memory_only += count
                self._memory_only_bytes += nbytes
                self.stats.memory_only += count
                for n, entry in enumerate(entries):
                    cache_append((first + n, entry, bodies[n][3], -1, 0, 0))
                self._cache_size += nbytes
            else:
                self._pending_disk += len(data)
                if self._caching and self._cache_size + nbytes <= self._cache_limit:
                    # Remember where each record ends on disk, so that committing cached
                    # entries also moves the disk read position past them.
                    end = start
                    offset = first
                    for entry, body in zip(entries, bodies, strict=True):
                        size = RECORD_OVERHEAD + len(body[0]) + len(body[1])  # record_size
                        end += size
                        cache_append((offset, entry, body[3], segment, end, size))
                        offset += 1
                    self._cache_size += nbytes
                else:
                    # From here on the writer reads these from disk, until it catches up.
                    self._caching = False
            if self._pending == count:  # it was empty: the writer may be waiting
                self._cond.notify()
        return True

    def _disk_refusal(self, incoming: int) -> str | None:
        """Why this chunk should not be written to disk now, or None. Lock held."""
        if self._disk_retry_at and self._clock() < self._disk_retry_at:
            return "write_error"
        # Keep the oldest: what is spooled stays until Redis confirms it. Once full, keep
        # refusing until Redis confirms something, so an outage makes one contiguous gap
        # rather than holes wherever a smaller chunk happened to fit.
        stuck = self._refusing and self._committed == self._refused_at
        over = self._pending_disk + self._memory_only_bytes + incoming > self._max_bytes
        if stuck or (self._pending_disk and over):
            if not self._refusing:
                self._refusing = True
                self._refused_at = self._committed
            return "max_bytes"
        self._refusing = False
        return None

    def _extend_floor(self, needed: int) -> bool:
        """Reserve offsets up to `needed` + a block, durably, before handing them out.
        Lock held; blocks for an fdatasync (rare: the flusher normally stays ahead)."""
        try:
            self._state.save(floor=needed + OFFSET_BLOCK)
        except OSError as exc:
            self._write_failed(exc, "the state file")
            return False
        self._floor = self._state.floor
        return True

    # -- what the daemon shows --------------------------------------------------------------

    def pending(self) -> tuple[int, int]:
        """(entries, payload bytes) not yet committed. Thread-safe snapshot."""
        return self._pending, self._pending_bytes

    def memory_only(self) -> int:
        """Pending entries that are in memory only: a crash now would lose them."""
        return self._memory_only

    def disk_bytes(self) -> int:
        with self._cond:
            return self._segments.total_bytes()

    def free_bytes(self) -> int | None:
        """Free bytes on the spool's filesystem (None if it cannot be asked)."""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    @property
    def writable(self) -> bool:
        """Whether the last write to the disk succeeded."""
        return self._writable

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    # -- durability -------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        try:
            while not self._stop.wait(self._fsync_interval):
                self.flush()
                now = self._clock()
                if now >= self._check_at:
                    self._check_at = now + self._check_interval
                    try:
                        self.verify()
                        self._probe()
                    except OSError as exc:  # e.g. EACCES on a stat: say so, check again
                        if self._should_log("check"):
                            log.error("spool: cannot check %s: %s", self._dir, exc)
        except BaseException as exc:  # a bug: report it through /healthz and the exit code
            self.failed = exc
            log.exception("the spool's flusher thread crashed")

    def flush(self) -> None:
        """fsync the active segment, save the cursor, keep the offset floor ahead. Any thread."""
        with self._cond:
            fd = self._segments.fsync_target()
            committed = self._committed
            floor = None
            if self._floor - self._next_offset < OFFSET_BLOCK // 2:
                floor = self._next_offset + OFFSET_BLOCK
        if fd >= 0:
            try:
                os.fsync(fd)
                self.stats.fsyncs += 1
            except OSError as exc:  # closed by a rotation meanwhile, or an I/O error
                if exc.errno != errno.EBADF:
                    with self._cond:
                        self._write_failed(exc, "(fsync) a segment file")
        if committed != self._state.cursor or floor is not None:
            try:
                self._state.save(cursor=committed, floor=floor)
            except OSError as exc:
                with self._cond:
                    self._write_failed(exc, "the state file")
            else:
                with self._cond:
                    self._floor = max(self._floor, self._state.floor)

    def close(self) -> None:
        """Stop the flusher, put what is in memory only on disk if it can, sync and close.

        Idempotent. What stays in memory only is lost: counted and logged, and no longer in
        `pending()`, which afterwards counts only what is safe on disk."""
        if self._closed:
            return
        self._stop.set()
        if self._flusher.is_alive():
            self._flusher.join(5.0)
        self.verify()  # a deletion not noticed yet must not be claimed safe below
        with self._read_lock, self._cond:
            self._closed = True
            if self._memory_only and not self._persist_memory_only():
                self._forget_memory_only()
        self.flush()
        with self._cond:
            self._segments.close_active()
        self._state.close()


__all__ = [
    "GAP",
    "SEGMENT_SUFFIX",
    "Batch",
    "DiskSpool",
    "Entry",
    "Route",
    "SpoolError",
    "SpoolStats",
    "entry_size",
]

"""A disk that fails under the spool: memory-only entries, refusals, and what /readyz says.

When a chunk cannot be written (no space, an I/O error, the directory gone), it is not
dropped: it is kept in the cache as *memory-only* entries (no place on disk), still written to
Redis, counted (forwarder_spool_memory_only_total), and lost only if the process ends before
Redis confirms them. The disk is tried again after DISK_RETRY seconds, at once when a commit
freed space, and by the flusher without traffic; memory-only entries are put back on disk
before anything newer, so the files stay in offset order. A chunk is refused (dropped) only
when memory is used up too (spool.memory_bytes), or when the spool is at spool.max_bytes and
Redis is not taking writes. While the disk fails, `problem()` says so (for /readyz 503).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import logging
import os
from collections import deque

from forwarder.spool_core import Cached, Place, SpoolCore
from forwarder.spool_records import Entry, encode, pack, record_size
from forwarder.spool_segments import SegmentWriteError
from forwarder.spool_state import describe_filesystem, free_bytes, fsync_dir

log = logging.getLogger("forwarder.spool")

DISK_RETRY = 0.5  # seconds without disk attempts after a failed write (less if space is freed)
LOSS_READY_HOLD = 60.0  # /readyz stays 503 this long after entries were lost from the spool
PROBE_BYTES = 64 * 1024  # written (and removed) to see whether a failed disk takes writes again


class FaultsMixin(SpoolCore):
    """What DiskSpool does when its disk fails. Every method: spool lock held, unless noted."""

    def _memory_room(self, nbytes: int, reason: str) -> bool:
        """Whether a chunk the disk did not take can be kept in memory.

        A full spool (max_bytes) passes through memory only while Redis takes writes; a
        failing disk always does, within memory_bytes (with hysteresis, see below). Cached
        entries that are also on disk make room: the writer reads them back from disk."""
        if reason == "max_bytes" and not self._redis_ok:
            return False
        # Once memory was full, take chunks again only when half of it is free: an outage
        # then makes one gap, not holes wherever a smaller chunk happened to fit.
        limit = self._cache_limit // 2 if self._memory_full else self._cache_limit
        cache = self._cache
        while self._cache_size + nbytes > limit and cache and cache[0][3] >= 0:
            self._cache_size -= cache.popleft()[2]
            self._caching = False
        self._memory_full = self._cache_size + nbytes > limit
        return not self._memory_full

    def _refuse(self, entries: list[Entry], reason: str) -> bool:
        """Count and log (rate-limited) a refused chunk. Returns False, for `append`."""
        count = len(entries)
        self.stats.dropped[reason] += count
        if self._should_log("drop"):
            route = self._routes[entries[0].subscription]
            if reason == "max_bytes":
                why = (
                    f"the spool is at spool.max_bytes ({self._max_bytes:,} bytes) and Redis "
                    "is not taking writes"
                )
            else:
                why = (
                    f"{self._write_problem or 'the disk cannot take them'}, and the "
                    f"{self._cache_limit:,} bytes of spool.memory_bytes are taken by frames "
                    "waiting for Redis"
                )
            log.error(
                "spool: dropped %d frames of %s/%s: %s; %d dropped so far "
                '(forwarder_spool_dropped_total{reason="%s"})',
                count,
                route.source,
                route.event,
                why,
                sum(self.stats.dropped.values()),
                reason,
            )
        return False

    def _write_failed(self, exc: OSError, what: str) -> None:
        """A write to the disk failed: count it, stop trying for a moment, say so."""
        self.stats.write_errors += 1
        self._disk_retry_at = self._clock() + DISK_RETRY
        was_writable = self._writable
        self._writable = False
        self._write_problem = (
            f"cannot write {what} in {self._dir}: {exc.strerror or exc} "
            f"({describe_filesystem(self._dir)})"
        )
        # The first failure is always logged; repeats at most every LOG_INTERVAL.
        if self._should_log("write") or was_writable:
            log.error(
                "spool: %s; frames are kept in memory only (not crash-safe) until the disk "
                "takes writes again, and dropped once spool.memory_bytes is used up "
                "(forwarder_spool_writable 0; %d failed writes so far)",
                self._write_problem,
                self.stats.write_errors,
            )

    def _write_recovered(self) -> None:
        self._writable = True
        self._disk_retry_at = 0.0
        log.info(
            "spool: writing to %s again (%d failed writes so far; %d frames went through "
            "memory only)",
            self._dir,
            self.stats.write_errors,
            self.stats.memory_only,
        )

    def problem(self) -> str | None:
        """Why the spool cannot do its job now (for /readyz), or None. Any thread, no lock."""
        if not self._writable:
            return self._write_problem
        loss_at = self._loss_at
        if loss_at is not None and self._clock() - loss_at < LOSS_READY_HOLD:
            return self._loss_problem
        return None

    # -- putting memory-only entries back on disk -------------------------------------------

    def _persist(self, items: list[tuple[int, Entry]]) -> dict[int, Place]:
        """Write entries (sorted by offset) that have no place on disk into new, sealed
        segments: one per run between existing segments, so that names stay in offset order.
        Stops at the first failure. Returns where each written entry now is."""
        places: dict[int, Place] = {}
        firsts = sorted(self._segments.sizes)
        runs = itertools.groupby(items, key=lambda item: bisect.bisect_right(firsts, item[0]))
        for _, run in runs:
            group = list(run)
            bodies, _, _ = encode([entry for _, entry in group], self._route_keys)
            offsets = [offset for offset, _ in group]
            data = pack(bodies, offsets)
            try:
                # Up to memory_bytes at once: do not write it all only to meet ENOSPC.
                if free_bytes(self._dir) < len(data):
                    raise SegmentWriteError(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), False)
                self._segments.write_sealed(offsets[0], data)
            except SegmentWriteError as exc:
                self._write_failed(exc.error, "a segment file")
                break
            except OSError as exc:  # statvfs failed: the directory is gone
                self._write_failed(exc, "a segment file")
                break
            end = 0
            for offset, body in zip(offsets, bodies, strict=True):
                size = record_size(body)
                end += size
                places[offset] = (offsets[0], end, size)
        if places:
            try:
                fsync_dir(self._dir)
            except OSError as exc:  # the data is there; only its name may not survive
                self._write_failed(exc, "the directory entry of a segment")
        return places

    def _persist_memory_only(self) -> bool:
        """Write the memory-only entries to disk, before anything newer. True if none is
        left in memory only."""
        if not self._memory_only:
            return True
        items = [(c[0], c[1]) for c in self._cache if c[3] < 0]
        self._segments.seal()  # what comes after them must go to a later segment
        places = self._persist(items)
        if not places:
            return False
        self._place(places)
        log.info(
            "spool: %d frames that were in memory only are on disk again%s",
            len(places),
            f" ({self._memory_only} still are not)" if self._memory_only else "",
        )
        return not self._memory_only

    def _place(self, places: dict[int, Place]) -> None:
        """Record that these memory-only entries are now on disk."""
        updated: deque[Cached] = deque()
        for c in self._cache:
            where = places.get(c[0])
            if where is not None and c[3] < 0:
                updated.append((c[0], c[1], c[2], *where))
                self._memory_only -= 1
                self._memory_only_bytes -= c[2]
                self._pending_disk += where[2]
            else:
                updated.append(c)
        self._cache = updated
        # The writer may hold some of them in its current batch: its commit must see them.
        for i, (offset, _) in enumerate(self._peeked):
            where = places.get(offset)
            if where is not None and i < len(self._peeked_records) and not self._peeked_records[i]:
                self._peeked_ends[i] = (where[0], where[1])
                self._peeked_records[i] = where[2]

    def _probe(self) -> None:
        """While the disk fails, try it again without waiting for traffic: put memory-only
        entries back, or write (and remove) a probe file. Flusher thread; takes the locks."""
        if self._writable or self._clock() < self._disk_retry_at:
            return
        with self._read_lock, self._cond:
            if self._closed:
                return
            if self._memory_only:
                if self._persist_memory_only():
                    self._write_recovered()
                return
            path = self._dir / "probe.tmp"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    written = os.write(fd, bytes(PROBE_BYTES))
                finally:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        path.unlink()
                if written < PROBE_BYTES:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # only part fitted
            except OSError as exc:
                self._write_failed(exc, "a probe file")
                return
            self._write_recovered()

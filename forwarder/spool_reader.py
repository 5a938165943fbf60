"""The writer's side of the spool: peek a batch, commit it, and the back-pressure hooks.

The writer reads the cache while it holds the next uncommitted offset, and the segment files
otherwise, in offset order; a batch is a run of consecutive offsets (a hole, where a
recovery counted frames as lost, is stepped over). Committing moves the read position, drops
the batch from the cache and retires every segment that no longer holds a pending record.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

from forwarder.spool_core import SpoolCore
from forwarder.spool_records import Batch, Entry

log = logging.getLogger("forwarder.spool")


class ReaderMixin(SpoolCore):
    """peek/commit for the single writer thread, and the hooks it calls to steer readers."""

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
        with self._read_lock:
            batch, limit = self._peek_cache(max_entries, at_head_only=True)
            if batch is None:
                batch = self._read_disk(max_entries, limit)
                if not batch:
                    # Nothing on disk before the cache: what is missing there is gone (a
                    # recovery counted it), so the cache goes next.
                    batch = self._peek_cache(max_entries, at_head_only=False)[0] or []
        if batch:
            self.oldest_received_at = batch[0][1].received_at
        return batch

    def _peek_cache(self, max_entries: int, at_head_only: bool) -> tuple[Batch | None, int]:
        """A run of consecutive offsets from the cache's head; None if the cache is empty
        or (`at_head_only`) does not start at the next uncommitted offset. The int: the
        offset the disk must be read up to (-1: no limit)."""
        with self._cond:
            first_wanted = self._committed + 1
            cache = self._cache
            # Cached entries older than the commit point can be left by a disk read-back.
            while cache and cache[0][0] < first_wanted:
                self._cache_size -= cache.popleft()[2]
            if not cache or (at_head_only and cache[0][0] != first_wanted):
                return None, cache[0][0] if cache else -1
            cached = list(itertools.islice(cache, min(max_entries, len(cache))))
            base = cached[0][0]
            if cached[-1][0] - base != len(cached) - 1:  # a hole: stop before it
                take = next(i for i, c in enumerate(cached) if c[0] != base + i)
                cached = cached[:take]
            # Columns by zip(), in C: this runs once per entry written.
            offsets, entries, sizes, segments, ends, records = zip(*cached, strict=True)
            batch = list(zip(offsets, entries, strict=True))
            self._peeked = batch
            self._peeked_sizes = list(sizes)
            self._peeked_ends = list(zip(segments, ends, strict=True))
            self._peeked_records = list(records)
            return batch, -1

    def _read_disk(self, max_entries: int, limit: int) -> Batch:
        """Read the next uncommitted records below `limit` from the segment files (writer
        thread, read lock held). Records below the limit were completely written before
        the limit was taken, so reading them needs no spool lock."""
        self.stats.disk_reads += 1
        batch: Batch = []
        ends: list[tuple[int, int]] = []
        sizes: list[int] = []
        records: list[int] = []
        with self._cond:
            sizes_now = dict(self._segments.sizes)
            firsts = sorted(sizes_now)
            last = self._committed
            read_first, read_pos = self._read_first, self._read_pos
        if not firsts:
            return batch
        if read_first not in firsts:
            read_first, read_pos = firsts[0], 0
        full = False
        try:
            for first in firsts:
                if first < read_first:
                    continue
                pos = read_pos if first == read_first else 0
                complete_to = sizes_now[first]
                for record, start, end in self._segments.read(
                    first, pos, complete_to, self._corrupt
                ):
                    if 0 <= limit <= record.offset:
                        full = True
                        break
                    if record.offset <= last:  # committed, or out of order: skip
                        continue
                    route = self._route_index.get(record.key)
                    if route is None:
                        with self._cond:
                            route = self._route_for_key(record.key)
                    entry = Entry(route, record.opcode, record.payload, record.received_at)
                    batch.append((record.offset, entry))
                    ends.append((first, end))
                    sizes.append(record.size)
                    records.append(end - start)
                    last = record.offset
                    if len(batch) >= max_entries:
                        full = True
                        break
                if full:
                    break
        except FileNotFoundError:
            # A segment vanished under us: find out what else did, and recover.
            self.verify()
            return []
        with self._cond:
            self._peeked = batch
            self._peeked_ends, self._peeked_sizes, self._peeked_records = ends, sizes, records
        return batch

    def _corrupt(self, skipped: int) -> None:
        self.stats.corrupt_records += 1
        self.stats.corrupt_bytes += skipped
        if self._should_log("corrupt"):
            log.error(
                "spool: skipped %d corrupt bytes (crc or framing mismatch); %d corrupt "
                "records so far (forwarder_spool_corrupt_records_total)",
                skipped,
                self.stats.corrupt_records,
            )

    def commit(self, batch: Batch) -> None:
        """Mark `batch` (the last peek, or a prefix of it) as written. Writer thread only."""
        if not batch:
            return
        count = len(batch)
        last_offset = batch[-1][0]
        with self._read_lock, self._cond:
            records = self._peeked_records[:count]
            sizes = self._peeked_sizes[:count]
            if self._memory_only:
                memory_only = [s for s, r in zip(sizes, records, strict=True) if not r]
                self._memory_only -= len(memory_only)
                self._memory_only_bytes -= sum(memory_only)
            cache = self._cache
            while cache and cache[0][0] <= last_offset:
                self._cache_size -= cache.popleft()[2]
            self._committed = last_offset
            self._pending -= count
            if self._readers_waiting and self._pending <= self._backlog // 2:
                self._cond.notify_all()
            self._pending_bytes -= sum(sizes)
            self._pending_disk -= sum(records)
            for _, entry in batch:
                self.pending_by_route[entry.subscription] -= 1
            self.stats.committed += count
            for i in range(count - 1, -1, -1):
                segment, end = self._peeked_ends[i]
                if segment >= 0:  # memory-only entries have no place on disk
                    self._read_first, self._read_pos = segment, end
                    break
            if not self._caching and not self._pending:
                self._caching = True  # caught up: new entries go through memory again
            paths = self._segments.retire(self._done_segments(last_offset))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if paths and self._disk_retry_at:
            self._disk_retry_at = 0.0  # space was freed: the next append may try the disk

    def _done_segments(self, committed: int) -> list[int]:
        """Segments whose records are all confirmed. Lock held."""
        segments = self._segments
        if self._pending_disk:
            return segments.done_before(committed)
        # Nothing on disk is pending: every closed segment is done, and the active one too
        # once it is worth a new file (or the disk is short of space: reclaim it now).
        done = [f for f in segments.sizes if f != segments.active_first]
        pressure = not self._writable or self._refusing
        active = segments.active_first
        if active >= 0 and (pressure or segments.active_size >= segments.segment_bytes // 4):
            done.append(active)
        return done

    def wake(self) -> None:
        """Make a waiting `peek` return now (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def writer_ok(self, ok: bool) -> None:
        """The writer reports whether Redis takes its writes (writer thread)."""
        if ok != self._writer_ok or ok != self._redis_ok:
            with self._cond:
                self._writer_ok = self._redis_ok = ok
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

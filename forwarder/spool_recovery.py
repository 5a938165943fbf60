"""Files deleted under a running spool: notice it, recreate, and say what was lost.

An operator's `rm -rf`, a tmpfiles cleaner or a full-disk clean-up script can delete the
spool directory or some of its files while forwarder runs. Appends would go on into unlinked
files, and the frames there would be gone at the next start, while the shutdown claimed them
safe. So the flusher checks every second (a few stat calls) that the directory, its small
files and every live segment are still the ones we wrote. If not, it recreates what is
missing (same writer-id, cursor and offset floor, so Redis' high-water mark still applies),
writes back to disk every pending entry still in memory (the cache and the writer's batch),
rebuilds the books from what exists, and counts the difference as lost
(forwarder_spool_lost_total), with an ERROR line and /readyz 503 for a while.
"""

from __future__ import annotations

import logging

from forwarder.spool_core import Cached, Place
from forwarder.spool_faults import FaultsMixin
from forwarder.spool_records import Entry, entry_size, scan
from forwarder.spool_state import SpoolError

log = logging.getLogger("forwarder.spool")


class RecoveryMixin(FaultsMixin):
    """The integrity check and the recovery of DiskSpool."""

    def verify(self) -> None:
        """Check that the directory and its files are still ours; recover if not.

        Any thread (the flusher calls it every second; the writer when a segment vanished
        while it read). Takes the locks."""
        if self._closed:
            return
        with self._cond:
            firsts = list(self._segments.sizes)
        # A first look without the spool lock (a stat per file): a segment retired or created
        # meanwhile can mislead it, so anything it finds is looked at again with the locks.
        dir_gone, problems = self._state.check()
        if not (dir_gone or problems or self._segments.missing(firsts)):
            return
        with self._read_lock, self._cond:
            # Again with both locks: a commit may have retired a segment meanwhile.
            dir_gone, problems = self._state.check()
            if dir_gone:
                gone = list(self._segments.sizes)
            else:
                gone = self._segments.missing(list(self._segments.sizes))
            if dir_gone or problems or gone:
                if gone and not dir_gone:
                    problems.append(f"{len(gone)} of its segment files were deleted")
                self._recover_loss(problems, gone)

    def _recover_loss(self, problems: list[str], gone: list[int]) -> None:
        """Rebuild the spool from what still exists. Both locks held."""
        committed = self._committed
        old_pending = self._pending
        old_by_route = list(self.pending_by_route)
        # 1. What is still in memory: the cache, and the batch the writer holds.
        memory: dict[int, Entry] = {c[0]: c[1] for c in self._cache if c[0] > committed}
        for offset, entry in self._peeked:
            if offset > committed:
                memory.setdefault(offset, entry)
        # 2. The directory and its small files.
        self._segments.forget(gone)
        self._segments.seal()  # what is written back must not be followed by older appends
        failure = ""
        try:
            self._state.recreate()
        except (OSError, SpoolError) as exc:
            failure = str(exc) if isinstance(exc, SpoolError) else (exc.strerror or str(exc))
        # 3. What survives on disk: offset -> (place, route, payload size).
        on_disk: dict[int, tuple[Place, int, int]] = {}
        for first in sorted(self._segments.sizes):
            try:
                data = self._segments.path(first).read_bytes()
            except OSError:
                self._segments.forget([first])
                continue
            for r in scan(data)[0]:
                if r.offset > committed and r.offset not in on_disk:
                    place = (first, r.end, r.end - r.start)
                    on_disk[r.offset] = (place, self._route_for_key(r.key), r.size)
        # 4. Put what is only in memory back on disk.
        places: dict[int, Place] = {}
        if not failure:
            places = self._persist(sorted((o, e) for o, e in memory.items() if o not in on_disk))
        # 5. The books, from what exists now.
        self._rebuild_books(memory, on_disk, places)
        lost = max(0, old_pending - self._pending)
        self.stats.lost += lost
        by_route = [
            (old - (self.pending_by_route[i] if i < len(self.pending_by_route) else 0), i)
            for i, old in enumerate(old_by_route)
        ]
        routes = ", ".join(
            f"{self._routes[i].source}/{self._routes[i].event}: {n}"
            for n, i in sorted(by_route, reverse=True)[:5]
            if n > 0
        )
        what = "; ".join(problems)
        self._loss_at = self._clock()
        self._loss_problem = (
            f"the spool directory {self._dir} was damaged while running ({what}); "
            f"{lost} frames lost"
        )
        if failure:
            outcome = (
                f"it cannot be recreated ({failure}): {self._memory_only} frames are kept in "
                "memory only"
            )
            self._writable = False
            self._write_problem = f"cannot recreate the spool directory {self._dir}: {failure}"
        else:
            outcome = (
                f"recreated it and wrote the {len(places)} frames still in memory back to disk"
            )
        if self._should_log("loss") or lost:
            log.error(
                "spool: %s: %s; %d frames that were only on disk are lost%s "
                "(forwarder_spool_lost_total %d); %s",
                self._dir,
                what,
                lost,
                f" ({routes})" if routes else "",
                self.stats.lost,
                outcome,
            )

    def _rebuild_books(
        self,
        memory: dict[int, Entry],
        on_disk: dict[int, tuple[Place, int, int]],
        places: dict[int, Place],
    ) -> None:
        """Pending counts, cache and the writer's batch, from what is in memory and on disk."""
        by_route = [0] * len(self._routes)
        pending_bytes = pending_disk = memory_only = memory_only_bytes = 0
        for place, route, size in on_disk.values():
            by_route[route] += 1
            pending_bytes += size
            pending_disk += place[2]
        cache: list[Cached] = []
        for offset in sorted(memory):
            entry = memory[offset]
            size = entry_size(entry)
            survivor = on_disk.get(offset)
            where = survivor[0] if survivor is not None else places.get(offset, (-1, 0, 0))
            if survivor is None:
                by_route[entry.subscription] += 1
                pending_bytes += size
                pending_disk += where[2]
                if where[0] < 0:
                    memory_only += 1
                    memory_only_bytes += size
            cache.append((offset, entry, size, *where))
        self._pending = len(on_disk) + sum(1 for o in memory if o not in on_disk)
        self._pending_bytes = pending_bytes
        self._pending_disk = pending_disk
        self._memory_only = memory_only
        self._memory_only_bytes = memory_only_bytes
        self.pending_by_route[:] = by_route  # in place: readers hold the list
        self._cache.clear()
        self._cache.extend(cache)
        self._cache_size = sum(c[2] for c in cache)
        cached = {c[0]: c for c in cache}
        for i, (offset, _) in enumerate(self._peeked):
            c = cached.get(offset)
            if c is not None and i < len(self._peeked_records):
                self._peeked_ends[i] = (c[3], c[4])
                self._peeked_records[i] = c[5]
        self._read_first, self._read_pos = -1, 0  # read from the first segment again

    def _forget_memory_only(self) -> None:
        """At close: what is still in memory only is lost. Count it and say so. Lock held."""
        lost = [c for c in self._cache if c[3] < 0]
        if not lost:
            return
        kept = [c for c in self._cache if c[3] >= 0]
        self._cache.clear()
        self._cache.extend(kept)
        self._cache_size = sum(c[2] for c in kept)
        for c in lost:
            self.pending_by_route[c[1].subscription] -= 1
        self._pending -= len(lost)
        self._pending_bytes -= sum(c[2] for c in lost)
        self._memory_only = self._memory_only_bytes = 0
        self.stats.lost += len(lost)
        log.error(
            "spool: %d frames that the disk could not take were not confirmed by Redis "
            "before the stop: they are lost (forwarder_spool_lost_total %d)",
            len(lost),
            self.stats.lost,
        )

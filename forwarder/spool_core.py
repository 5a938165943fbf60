"""The books every part of the spool shares: routes, pending counts, the cache, the last peek.

DiskSpool (spool.py: set-up, append, durability) is assembled from this base and mixins, one
module per concept: spool_reader.py (the writer's peek and commit), spool_faults.py (a disk
that fails: memory-only entries, refusals, readiness) and spool_recovery.py (files deleted
under a running spool). Only DiskSpool.__init__ assigns these
attributes; the annotations here let each part use them.

Locking (for every part): `_cond` (the spool lock) guards the books below; `_read_lock` (an
RLock) is held by the writer while it peeks or commits and by a recovery, which moves
entries; when both are taken, `_read_lock` first.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.spool_records import Batch, Entry, Route
from forwarder.spool_segments import SegmentFiles
from forwarder.spool_state import SpoolState

log = logging.getLogger("forwarder.spool")

LOG_INTERVAL = 10.0  # seconds between two ERROR lines of the same kind

# The cache: a run of entries in offset order (with holes where entries are on disk only):
# (offset, entry, payload size, segment of the record or -1 if memory-only, end of the record
# in it, record size or 0 if memory-only).
Cached = tuple[int, Entry, int, int, int, int]
# Where a record is: (segment, end of the record in it, record size).
Place = tuple[int, int, int]


@dataclass
class SpoolStats:
    """Counters of the spool. Fields are written under the spool lock or by the writer."""

    appended: int = 0
    committed: int = 0
    # Entries refused, by reason: "max_bytes" (the spool at spool.max_bytes while Redis is
    # unavailable) or "write_error" (the disk failing and memory used up as well).
    dropped: dict[str, int] = field(default_factory=lambda: {"max_bytes": 0, "write_error": 0})
    memory_only: int = 0  # entries the disk could not take, kept in memory only
    lost: int = 0  # entries accepted and then lost before Redis confirmed them
    corrupt_records: int = 0  # records skipped because their crc or framing was wrong
    corrupt_bytes: int = 0
    disk_reads: int = 0  # batches the writer had to read back from disk
    fsyncs: int = 0
    write_errors: int = 0  # failed writes, fsyncs or saves of the spool's files


class SpoolCore:
    """Shared state and helpers of DiskSpool's parts; not used on its own."""

    _dir: Path
    _clock: Callable[[], float]
    _cond: threading.Condition
    _read_lock: threading.RLock
    _segments: SegmentFiles
    _state: SpoolState
    stats: SpoolStats
    _routes: list[Route]
    _route_index: dict[bytes, int]
    _route_keys: list[bytes]
    pending_by_route: list[int]
    _committed: int
    _next_offset: int
    _pending: int
    _pending_bytes: int
    _pending_disk: int
    _memory_only: int
    _memory_only_bytes: int
    _cache: deque[Cached]
    _cache_size: int
    _cache_limit: int
    _caching: bool
    _peeked: Batch
    _peeked_ends: list[tuple[int, int]]
    _peeked_sizes: list[int]
    _peeked_records: list[int]
    _read_first: int
    _read_pos: int
    _last_log: dict[str, float]
    _max_bytes: int
    _redis_ok: bool  # the writer's last Redis call succeeded
    _refusing: bool  # at max_bytes, and Redis has confirmed nothing since
    _memory_full: bool  # memory refused a chunk and is not half free again yet
    _writable: bool  # the last write to the disk succeeded
    _write_problem: str | None  # why not, for /readyz and the logs
    _disk_retry_at: float  # clock(): no disk attempt before this after a failure
    _loss_at: float | None  # clock() of the last loss of spooled entries
    _loss_problem: str | None
    _closed: bool
    _backlog: int  # pending entries past which readers wait for a healthy writer
    _readers_waiting: int
    _writer_ok: bool  # Redis takes the writer's writes (readers may be held back)
    oldest_received_at: float | None

    def verify(self) -> None:
        """Check the directory; recover if files went missing (spool_recovery.py)."""
        raise NotImplementedError

    def _should_log(self, kind: str) -> bool:
        """Rate limit for repeated ERROR lines: True at most once per LOG_INTERVAL per kind."""
        now = self._clock()
        if now - self._last_log.get(kind, -LOG_INTERVAL) < LOG_INTERVAL:
            return False
        self._last_log[kind] = now
        return True

    def _route_for_key(self, key: bytes) -> int:
        """The route index of a record's key, registering routes found only on disk.

        Call with the spool lock held (or before the spool is shared)."""
        index = self._route_index.get(key)
        if index is None:
            route = Route.from_key(key)
            index = self._register(route, key)
            log.warning(
                "spool: frames of %s/%s (no longer configured) will still be written to %r",
                route.source,
                route.event,
                route.stream,
            )
        return index

    def _register(self, route: Route, key: bytes) -> int:
        index = len(self._routes)
        self._routes.append(route)
        self._route_keys.append(key)
        self._route_index[key] = index
        self.pending_by_route.append(0)
        return index

    def add_route(self, route: Route) -> int:
        """The index of `route`, registering it if new (a subscription added by a reload)."""
        key = route.key()
        with self._cond:
            index = self._route_index.get(key)
            return self._register(route, key) if index is None else index

    @property
    def routes(self) -> list[Route]:
        """Routes by index: the configured subscriptions first, then any found on disk."""
        return self._routes

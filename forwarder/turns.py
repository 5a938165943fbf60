"""The parts of an I/O loop's turn that are not sockets: an inbox other threads post to, the
heap of the subscriptions' deadlines, and the chunk of entries a turn hands to the spool.

All three belong to one `IOLoop` (loop.py) and run on its thread, except `Inbox.call`.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import math
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from forwarder.gaps import Outbox
from forwarder.spool import GAP, DiskSpool, Entry
from forwarder.stats import SubscriptionStats

log = logging.getLogger(__name__)

COALESCE_BELOW = 64 * 1024  # a smaller chunk spooled is followed by COALESCE_PAUSE
COALESCE_PAUSE = 0.001  # seconds
BACKLOG_WAIT = 0.05  # at most this long a loop waits for a lagging (healthy) writer
DROP_LOG_INTERVAL = 10.0  # seconds between two ERROR lines about refused frames
MIN_TICK = 0.01  # a deadline that is already past is retried no sooner than this
RESCHEDULE_SLACK = 1.0  # seconds a deadline may move later before its heap entry is replaced


class Inbox:
    """Functions for the loop thread, posted by any thread, with a wake-up through a socket
    pair registered with the loop's selector (its key's data is None)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        selector.register(self._r, selectors.EVENT_READ, None)
        # Shared with other threads: the functions, and whether a wake-up byte is already on
        # its way (a hint: a spurious wake-up costs one empty turn, a missed one cannot happen
        # because the flag is cleared before the queue is drained).
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._woken = False

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread, soon. Any thread; never blocks."""
        self._queue.append(fn)
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
                self._w.send(b"\0")

    def __bool__(self) -> bool:
        return bool(self._queue)

    def woken(self) -> None:
        """The selector reported the wake-up socket readable."""
        self._woken = False
        with contextlib.suppress(BlockingIOError):
            while self._r.recv(4096):
                pass

    def run(self) -> None:
        while self._queue:
            self._queue.popleft()()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._r.close()
            self._w.close()


class Scheduled(Protocol):
    scheduled: float  # the live heap entry's deadline (inf: none)


T = TypeVar("T", bound=Scheduled)


class Timers(Generic[T]):
    """The deadlines of a loop's subscriptions in one heap, one live entry each.

    An earlier deadline is pushed at once; a later one only when it moved by more than
    RESCHEDULE_SLACK (a pong moving the next ping 10 s on), so a busy connection, whose every
    read moves its deadline a little, costs no push per read; entries left behind are stale
    and skipped when popped. A subscription asked early just finds nothing due."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()  # ties never compare the items

    def schedule(self, item: T, due: float) -> None:
        scheduled = item.scheduled
        if due < scheduled or due > scheduled + RESCHEDULE_SLACK:
            now = self._clock()
            if due <= now:  # only after a tick that could not act yet: never a busy loop
                due = now + MIN_TICK
            item.scheduled = due
            heapq.heappush(self._heap, (due, next(self._seq), item))

    def next_due(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def due(self, live: Callable[[T], bool]) -> Iterator[T]:
        """Pop the items whose deadline has come (`scheduled` reset to inf); `live` filters
        out the ones gone meanwhile. Items rescheduled while iterating wait for next time."""
        heap = self._heap
        now = self._clock()
        while heap and heap[0][0] <= now:
            due, _, item = heapq.heappop(heap)
            if due != item.scheduled or not live(item):
                continue  # stale: an earlier deadline replaced it, or the item left
            item.scheduled = math.inf
            yield item


class SpoolFeed:
    """Everything a loop turn produced (frames and gap records, in order) to the spool as one
    chunk, and the accounting when the spool refuses it."""

    def __init__(
        self, name: str, spool: DiskSpool, clock: Callable[[], float], halt: threading.Event
    ) -> None:
        self.outbox = Outbox()  # shared by the rules of the loop's subscriptions
        self._name = name
        self._spool = spool
        self._clock = clock
        self._halt = halt  # set when the loop must stop: cuts pauses short
        self._stats_of: dict[int, SubscriptionStats] = {}  # route index -> its stats
        self._last_drop_log = -math.inf

    def register(self, index: int, stats: SubscriptionStats) -> None:
        self._stats_of[index] = stats

    def flush(self) -> None:
        if not self.outbox.entries:
            return
        entries, nbytes = self.outbox.take()
        if self._spool.append(entries, nbytes):
            # If the writer is behind while Redis is healthy, let it catch up (bounded; never
            # during an outage). Nothing is lost: the next frames wait in the socket buffers.
            self._spool.wait_for_writer(BACKLOG_WAIT)
            if nbytes < COALESCE_BELOW:
                # A small chunk under heavy traffic costs as much as a large one (a lock, a
                # write, a few syscalls): let a millisecond's worth of frames gather in the
                # socket buffers first. Adds at most 1 ms of latency.
                self._halt.wait(COALESCE_PAUSE)
            return
        self._refused(entries)

    def _refused(self, entries: list[Entry]) -> None:
        frames: dict[int, int] = {}
        gaps = 0
        for entry in entries:
            if entry.opcode == GAP:
                gaps += 1
            else:
                frames[entry.subscription] = frames.get(entry.subscription, 0) + 1
        for index, count in frames.items():
            stats = self._stats_of.get(index)
            if stats is not None:
                stats.dropped += count
        now = self._clock()
        if now - self._last_drop_log < DROP_LOG_INTERVAL:
            return
        self._last_drop_log = now
        pending, pending_bytes = self._spool.pending()
        log.error(
            "%s: the spool refused %d frames and %d gap records (%d frames, %d bytes waiting "
            "for Redis); they are lost and counted in forwarder_messages_dropped_total",
            self._name,
            sum(frames.values()),
            gaps,
            pending,
            pending_bytes,
        )

"""The hand-off between subscriber threads and the Redis writer.

Subscribers append what they received; the single writer peeks a batch, writes it, and only
then commits it, so a batch whose write failed is retried as the very same batch. Every entry
gets a monotonically increasing offset, which the writer uses to make writes idempotent.

`MemorySpool` keeps entries in memory up to a byte limit; past it, new entries are refused
and the caller counts and reports them (never silently). A disk-backed spool with the same
interface replaces it for durability across Redis outages and restarts.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import NamedTuple

from forwarder.frames import Oversized

# An internal opcode (outside RFC 6455's 4 bits) for a gap record: an interval in which a
# subscription was not receiving. Its payload is a JSON object of the record's fields; the
# writer appends it to the gap stream, ordered with the frames of its subscription.
GAP = 0x100


class Entry(NamedTuple):
    """One received frame (or a GAP record), as the subscriber saw it."""

    subscription: int  # index into the daemon's subscription list
    opcode: int
    payload: bytes | Oversized
    received_at: float  # unix time


def entry_size(entry: Entry) -> int:
    payload = entry.payload
    return len(payload) if isinstance(payload, bytes) else len(payload.head)


class MemorySpool:
    """Bounded FIFO. Thread-safe: many producers, exactly one consumer (peek/commit)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._first_offset = 1  # offset of self._entries[0]
        self._cond = threading.Condition(threading.Lock())

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        """Append a chunk's entries atomically; False (nothing appended) if over the limit.

        Non-blocking: a subscriber never waits for Redis.
        """
        with self._cond:
            if self._bytes + nbytes > self._max_bytes and self._entries:
                return False
            was_empty = not self._entries
            self._entries.extend(entries)
            self._bytes += nbytes
            if was_empty:
                self._cond.notify()
        return True

    def peek(self, max_entries: int, timeout: float) -> tuple[int, list[Entry]]:
        """Wait up to `timeout` for entries; return (offset of the first, up to max entries).

        Consumer only. Entries stay in the spool until `commit`.
        """
        with self._cond:
            if not self._entries:
                self._cond.wait(timeout)
            entries = self._entries
            if len(entries) <= max_entries:
                batch = list(entries)
            else:
                batch = [entries[i] for i in range(max_entries)]
            return self._first_offset, batch

    def commit(self, count: int, nbytes: int) -> None:
        """Drop the first `count` entries (written). Consumer only."""
        with self._cond:
            for _ in range(count):
                self._entries.popleft()
            self._bytes -= nbytes
            self._first_offset += count

    def wake(self) -> None:
        """Make a waiting `peek` return now (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> tuple[int, int]:
        """(entries, payload bytes) not yet committed. Thread-safe snapshot."""
        return len(self._entries), self._bytes

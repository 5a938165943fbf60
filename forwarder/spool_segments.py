"""The segment files of a spool directory: appending, rotating, retiring, reading back.

Segment files are named after the offset of their first record, so their names sort in
offset order and, inside a file, records follow in offset order too: a reader that walks
the files in name order meets every offset in increasing order. Nothing here knows about
Redis or the cache: the spool (spool.py) decides what goes where.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from forwarder.spool_records import Record, decode, record_length, resync
from forwarder.spool_state import fsync_dir

SEGMENT_SUFFIX = ".seg"
READ_CHUNK = 1 << 20  # bytes read from a segment at a time when replaying a backlog


class SegmentWriteError(Exception):
    """A write failed. `dirty`: part of it may still be in the file (the undo failed too),
    so the offsets it carried must never be handed out again."""

    def __init__(self, error: OSError, dirty: bool) -> None:
        super().__init__(error.strerror)
        self.error = error
        self.dirty = dirty


class SegmentFiles:
    """The segments of one directory and the one being appended to.

    Not thread-safe on its own: the spool calls every method with its lock held, except
    `read`, which the writer thread calls unlocked on records that were completely written
    before it looked (see DiskSpool.peek).
    """

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self._dir = directory
        self.segment_bytes = segment_bytes
        self.sizes: dict[int, int] = {}  # first offset -> bytes, every live segment
        self.fd = -1  # the active segment, open for appending
        self.active_first = -1
        self.active_size = 0
        self.dirty = False  # written since the last fsync
        self._reuse = -1  # a segment left by the previous run that appends may continue

    def path(self, first: int) -> Path:
        return self._dir / f"{first:020d}{SEGMENT_SUFFIX}"

    def on_disk(self) -> list[int]:
        """First offsets of the segment files present in the directory, sorted."""
        firsts = []
        for p in self._dir.glob("*" + SEGMENT_SUFFIX):
            stem = p.name[: -len(SEGMENT_SUFFIX)]
            if stem.isdigit():
                firsts.append(int(stem))
        return sorted(firsts)

    def adopt(self, first: int, size: int, last: bool) -> None:
        """Take over a segment found at start-up; appends continue in the `last` one."""
        self.sizes[first] = size
        if last and size < self.segment_bytes:
            self._reuse = first

    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    # -- append side --------------------------------------------------------------------

    def write(self, first: int, data: bytes) -> tuple[int, int]:
        """Append the records of offsets first.. (one write); (segment, position before).

        Raises SegmentWriteError; the file is then cut back to where it was."""
        try:
            if self.fd < 0 or self.active_size >= self.segment_bytes:
                self._rotate(first)
        except OSError as exc:
            raise SegmentWriteError(exc, dirty=False) from None
        start = self.active_size
        try:
            written = os.write(self.fd, data)
            while written < len(data):  # a short write (disk almost full, signal): finish it
                written += os.write(self.fd, data[written:])
        except OSError as exc:
            raise SegmentWriteError(exc, dirty=not self._undo(start)) from None
        self.active_size += len(data)
        self.sizes[self.active_first] = self.active_size
        self.dirty = True
        return self.active_first, start

    def _undo(self, size: int) -> bool:
        """Cut the active segment back to `size` after a failed write; False if we could not.

        A segment left empty is removed, so that every segment's name stays the offset of
        its first record."""
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            self.close_active()  # never append after bytes we could not remove
            return False
        if size == 0:
            first = self.active_first
            self.close_active()
            self.sizes.pop(first, None)
            with contextlib.suppress(OSError):
                self.path(first).unlink()
        return True

    def _rotate(self, first: int) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            self.close_active()
        if self._reuse >= 0 and self._reuse in self.sizes:
            # Keep appending to the last segment of a previous run (after its torn tail was
            # cut) rather than starting a nearly empty one.
            first = self._reuse
        self._reuse = -1
        new = first not in self.sizes
        fd = os.open(self.path(first), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if new:
                fsync_dir(self._dir)  # the new file's name survives a power cut
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.active_first = first
        self.active_size = size
        self.sizes[first] = size

    def write_sealed(self, first: int, data: bytes) -> None:
        """Write a whole new segment that nothing is appended to afterwards (records put
        back on disk after a failure or a deletion); fsynced, its name not yet (the caller
        fsyncs the directory once). Raises SegmentWriteError, leaving no file behind."""
        path = self.path(first)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise SegmentWriteError(exc, dirty=False) from None
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise SegmentWriteError(exc, dirty=False) from None
        os.close(fd)
        self.sizes[first] = len(data)

    def seal(self) -> None:
        """Close the active segment for good: the next write starts a new one."""
        self.close_active()
        self._reuse = -1

    def close_active(self) -> None:
        """Stop appending to the active segment (it stays on the books)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.active_first = -1

    def fsync_target(self) -> int:
        """The fd to fsync if the active segment changed since the last call, else -1."""
        fd = self.fd if self.dirty else -1
        self.dirty = False
        return fd

    def retire(self, firsts: list[int]) -> list[Path]:
        """Forget these segments (closing the active one if it is among them); the caller
        unlinks the returned paths outside its lock."""
        paths = []
        for first in firsts:
            if first == self.active_first:
                self.close_active()
            self.sizes.pop(first, None)
            paths.append(self.path(first))
        return paths

    def done_before(self, committed: int) -> list[int]:
        """Closed segments whose every record is at or below `committed`: those followed by
        a segment that starts at or below committed + 1."""
        firsts = sorted(self.sizes)
        return [
            first
            for first, nxt in itertools.pairwise(firsts)
            if nxt <= committed + 1 and first != self.active_first
        ]

    # -- integrity ----------------------------------------------------------------------

    def missing(self, firsts: list[int]) -> list[int]:
        """Which of these segments have been deleted (the active one: unlinked while open).

        Exact with the spool lock held; without it, a hint (files come and go meanwhile)."""
        gone = []
        for first in firsts:
            if first not in self.sizes:
                continue
            if first == self.active_first and self.fd >= 0:
                try:
                    if os.fstat(self.fd).st_nlink == 0:
                        gone.append(first)
                        continue
                except OSError:
                    gone.append(first)
                    continue
            if not self.path(first).exists():
                gone.append(first)
        return gone

    def forget(self, firsts: list[int]) -> None:
        """Drop segments that are gone from the books (nothing is unlinked)."""
        for first in firsts:
            if first == self.active_first:
                self.close_active()
            self.sizes.pop(first, None)

    # -- read side ----------------------------------------------------------------------

    def read(
        self, first: int, pos: int, complete_to: int, on_corrupt: Callable[[int], None]
    ) -> Iterator[tuple[Record, int, int]]:
        """Records of a segment from byte `pos`: (record, start, end), file positions.

        `complete_to`: the file's size when the caller looked (under the spool lock). Every
        write before then was whole, so bytes before it that never complete a record are
        corrupt (skipped, reported to `on_corrupt`); after it, they may be a record being
        written right now, and reading stops there. Raises FileNotFoundError if it is gone."""
        with open(self.path(first), "rb") as f:
            f.seek(pos)
            data = f.read(READ_CHUNK)
            base = pos  # file position of data[0]
            i = 0
            while True:
                record = decode(data, i)
                if record is None:  # need more bytes (or the end of the segment)
                    more = f.read(max(READ_CHUNK, record_length(data, i)))
                    if more:
                        data = data[i:] + more
                        base += i
                        i = 0
                        continue
                    if i >= len(data) or base + i >= complete_to:
                        return
                    record = resync(data, i)
                if isinstance(record, int):
                    on_corrupt(record - i)
                    i = record
                    continue
                yield record, base + i, base + record.end
                i = record.end

"""The small files beside the segments: lock, identity, cursor and offset floor.

    lock       flock()ed while a process uses the directory (two processes must not share it)
    writer-id  a stable identity for the spool: the name of its high-water mark in Redis
    state      the committed offset (cursor) and the offset floor, in two checksummed slots

The floor makes offsets monotonic across machine crashes. The spool never hands out an
offset at or above the floor saved here, and a run starts at max(floor, what the segments
show). A power cut can take the unsynced tail of a segment, and with it the highest offsets
handed out, but never an fsynced floor; without it the next run would give already-applied
offsets to new frames, and the high-water mark in Redis would skip them as duplicates.

The state file is overwritten in place (two 32-byte slots, written alternately and
fdatasync'ed), so saving it needs no new disk block: it keeps working on a full disk, and a
torn write leaves the other slot. Older spools kept only a `cursor` file: it is read once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import uuid
import zlib
from pathlib import Path

from forwarder.errors import ForwarderError

log = logging.getLogger(__name__)

_SLOT = struct.Struct("<4sIQQQ")  # magic, crc32 of the rest, generation, cursor, floor
_SLOT_MAGIC = b"FWST"
STATE_FILE = "state"
LEGACY_CURSOR_FILE = "cursor"
LOCK_FILE = "lock"
WRITER_ID_FILE = "writer-id"


class SpoolError(ForwarderError):
    """The spool directory cannot be used (permissions, disk, another process holds it)."""


def describe_filesystem(path: Path) -> str:
    """Where `path` lives and how full that is, for error messages: mount point, free bytes."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
        mount = mount_point(existing)
    except OSError as exc:
        return f"filesystem unknown: {exc.strerror}"
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    return f"filesystem mounted at {mount}: {free:,} of {total:,} bytes free"


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (which must exist)."""
    path = path.resolve()
    dev = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def filesystem_bytes(path: Path) -> int:
    """The size of `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def fsync_dir(path: Path) -> None:
    """Make the names created in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolState:
    """The lock, writer-id and state files of one spool directory.

    Thread-safety: `save` may be called from any thread (its own lock serialises writes);
    `check` and `recreate` from the spool's maintenance thread with the spool lock held.
    """

    def __init__(self, directory: Path) -> None:
        """Lock the directory (creating it) and read or create its files; SpoolError if not."""
        self._dir = directory
        self._lock = threading.Lock()
        self._lock_fd = -1
        self._state_fd = -1
        self._generation = 0
        self.cursor = 0  # as last saved
        self.floor = 0  # as last saved: durable, offsets below it may be handed out
        try:
            self._open()
        except OSError as exc:
            self.close()
            raise SpoolError(
                f"spool.dir {directory}: cannot use it: {exc.strerror} "
                f"({describe_filesystem(directory)})"
            ) from None
        except SpoolError:
            self.close()
            raise

    def _open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._identity = self._dir_identity()
        self._lock_fd = self._take_lock()
        self.writer_id = self._read_writer_id()
        self._state_fd = os.open(self._dir / STATE_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        if not self._load():
            self.cursor = self._read_legacy_cursor()
            self._initialise()

    def _take_lock(self) -> int:
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"spool.dir {self._dir}: another forwarder process is using it "
                "(two processes must not share a spool)"
            ) from None
        return fd

    def _dir_identity(self) -> tuple[int, int]:
        st = os.stat(self._dir)
        return st.st_dev, st.st_ino

    def _read_writer_id(self) -> str:
        path = self._dir / WRITER_ID_FILE
        try:
            text = path.read_text().strip()
            if text:
                return text
        except FileNotFoundError:
            pass
        value = uuid.uuid4().hex
        self._write_new(path, value.encode())
        return value

    def _read_legacy_cursor(self) -> int:
        try:
            return int((self._dir / LEGACY_CURSOR_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.error("spool cursor unreadable (%s): replaying the whole spool", exc)
            return 0

    def _write_new(self, path: Path, data: bytes) -> None:
        """Write a small file atomically and durably (tmp, fsync, rename, fsync the dir)."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self._dir)

    # -- the state slots ----------------------------------------------------------------

    def _load(self) -> bool:
        """Read the newest valid slot; False if the file holds none (new, or both torn)."""
        data = os.pread(self._state_fd, 2 * _SLOT.size, 0)
        best: tuple[int, int, int] | None = None
        for slot in range(2):
            raw = data[slot * _SLOT.size : (slot + 1) * _SLOT.size]
            if len(raw) < _SLOT.size:
                continue
            magic, crc, generation, cursor, floor = _SLOT.unpack(raw)
            if magic != _SLOT_MAGIC or zlib.crc32(raw[8:]) != crc:
                continue
            if best is None or generation > best[0]:
                best = (generation, cursor, floor)
        if best is None:
            if data.strip(b"\0"):
                log.error(
                    "spool: %s is damaged (both slots fail their checksum): the offset "
                    "floor is taken from the segments",
                    self._dir / STATE_FILE,
                )
            return False
        self._generation, self.cursor, self.floor = best
        return True

    def _initialise(self) -> None:
        """Fill both slots of a new state file and make its name durable."""
        self._generation = 1
        for _ in range(2):
            self._write_slot(self.cursor, self.floor)
        fsync_dir(self._dir)
        legacy = self._dir / LEGACY_CURSOR_FILE
        if legacy.exists():
            legacy.unlink()

    def _write_slot(self, cursor: int, floor: int) -> None:
        self._generation += 1
        body = struct.pack("<QQQ", self._generation, cursor, floor)
        raw = _SLOT.pack(_SLOT_MAGIC, zlib.crc32(body), self._generation, cursor, floor)
        if os.pwrite(self._state_fd, raw, (self._generation % 2) * _SLOT.size) != len(raw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fdatasync(self._state_fd)

    def save(self, cursor: int | None = None, floor: int | None = None) -> None:
        """Durably record the cursor and/or a higher floor (the floor never goes down).

        Blocks for an fdatasync; raises OSError if the write fails (nothing changes then).
        """
        with self._lock:
            new_cursor = self.cursor if cursor is None else cursor
            new_floor = self.floor if floor is None else max(self.floor, floor)
            self._write_slot(new_cursor, new_floor)
            self.cursor, self.floor = new_cursor, new_floor

    # -- integrity ----------------------------------------------------------------------

    def check(self) -> tuple[bool, list[str]]:
        """What has gone from under us: (the whole directory?, what, in words)."""
        try:
            if self._dir_identity() != self._identity:
                return True, [f"{self._dir} was replaced by another directory"]
        except FileNotFoundError:
            return True, [f"{self._dir} was deleted"]
        problems = []
        for name, fd in ((LOCK_FILE, self._lock_fd), (STATE_FILE, self._state_fd)):
            if fd < 0 or os.fstat(fd).st_nlink == 0:
                problems.append(f"its {name} file was deleted")
        if not (self._dir / WRITER_ID_FILE).exists():
            problems.append(f"its {WRITER_ID_FILE} file was deleted")
        return False, problems

    def recreate(self) -> None:
        """Recreate the directory and the files that went missing, keeping the identity,
        cursor and floor in memory. Raises OSError or SpoolError (another process)."""
        with self._lock:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            identity = self._dir_identity()
            replaced = identity != self._identity
            if replaced or os.fstat(self._lock_fd).st_nlink == 0:
                fd = self._take_lock()
                os.close(self._lock_fd)
                self._lock_fd = fd
            self._identity = identity
            path = self._dir / WRITER_ID_FILE
            if not path.exists():
                self._write_new(path, self.writer_id.encode())
            if replaced or os.fstat(self._state_fd).st_nlink == 0:
                fd = os.open(self._dir / STATE_FILE, os.O_RDWR | os.O_CREAT, 0o600)
                os.close(self._state_fd)
                self._state_fd = fd
                self._generation = 1
                for _ in range(2):
                    self._write_slot(self.cursor, self.floor)
            fsync_dir(self._dir)

    def close(self) -> None:
        """Release the lock and close the files. Idempotent."""
        for fd in (self._state_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._state_fd = self._lock_fd = -1

"""Reading configured files: regular files only, bounded, and never blocking on a pipe."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest

from forwarder.errors import UnreadableFile
from forwarder.files import read_regular_file


def read_within(path: Path, limit: int = 1024, seconds: float = 10.0) -> bytes | Exception:
    """Read `path` in a thread; fail the test if the read is still blocked after `seconds`."""
    result: list[bytes | Exception] = []

    def read() -> None:
        try:
            result.append(read_regular_file(path, limit))
        except Exception as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        release_fifo(path)
        raise AssertionError(f"reading {path} blocked for {seconds} s")
    return result[0]


def release_fifo(path: Path) -> None:
    """Open a FIFO's write end and close it, so a reader blocked on it sees EOF."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_regular_file_is_read_whole() -> None:
    """The bytes of a regular file come back as they are, up to the limit."""
    path = Path(__file__)
    assert read_regular_file(path, 1024 * 1024) == path.read_bytes()


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "socket"])
def test_special_files_are_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO (nobody writing), a directory, a device or a socket: refused, never waited on."""
    path = tmp_path / kind
    expected = {
        "fifo": "a named pipe",
        "directory": "a directory",
        "device": "a character device",
        "socket": "a socket",
    }[kind]
    server = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/zero")  # endless: reading it "whole" would never finish
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    try:
        outcome = read_within(path)
    finally:
        if server is not None:
            server.close()
    assert isinstance(outcome, UnreadableFile)
    assert str(outcome) == f"not a regular file ({expected})"


def test_a_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    """A file larger than the limit is an error, not a silent truncation."""
    path = tmp_path / "big"
    path.write_bytes(b"x" * 2049)
    with pytest.raises(UnreadableFile, match="larger than 2048 bytes"):
        read_regular_file(path, 2048)
    path.write_bytes(b"x" * 2048)
    assert len(read_regular_file(path, 2048)) == 2048


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    """The reason is the system's (no such file), without a traceback."""
    with pytest.raises(UnreadableFile, match="No such file or directory"):
        read_regular_file(tmp_path / "missing", 10)

"""A real, small filesystem for disk-full tests: a tmpfs mounted for one test.

Mounting needs root, which `make test` and CI have. Without it the test FAILS with a message
saying so: a disk-full test that silently does not run would prove nothing.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SIZE = 2 * 1024 * 1024  # the size of the reproduction


@contextmanager
def mounted_tmpfs(path: Path, size: int = SIZE) -> Iterator[Path]:
    """Mount a tmpfs of `size` bytes at `path` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"cannot mount a {size}-byte tmpfs at {path}: {proc.stderr.strip() or proc.returncode}"
            " (the disk-full tests need root and tmpfs, as in CI; they never skip)"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_up(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem is full (less `leave` bytes); return it.
    Removing the file gives the space back."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):  # bounded: the filesystem is small
            block = bytes(chunk)
            for _ in range(SIZE * 4 // chunk + 1):
                try:
                    if os.write(fd, block) < chunk:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler

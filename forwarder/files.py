"""Reading the files a configuration names: the configuration itself, tokens, TLS files.

Only regular files are read. A named pipe blocks its reader until someone writes to it
(`check-config` hung forever on a token file that was a FIFO), and a device can be endless
(`/dev/zero`) or have side effects. So a file is opened with ``O_NONBLOCK`` (opening a FIFO
then returns at once instead of waiting for a writer), checked with ``fstat`` on the open
descriptor (no window between the check and the read), and read up to a size limit.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from forwarder.errors import UnreadableFile

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def read_regular_file(path: Path, limit: int) -> bytes:
    """Return the whole content of the regular file `path`, at most `limit` bytes.

    Never blocks on a FIFO or a device. Raises UnreadableFile with the reason (missing,
    permission denied, not a regular file, too large); the message never holds the content.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a Unix socket cannot be opened like a file
            raise UnreadableFile("not a regular file (a socket)") from None
        raise UnreadableFile(exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "a special file")
            raise UnreadableFile(f"not a regular file ({kind})")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise UnreadableFile(f"larger than {limit} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)

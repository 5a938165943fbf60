"""Shared test helpers: bounded waiting, free ports, a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import redis

_PAUSE = threading.Event()  # never set: an interruptible pause for polling loops


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` every 20 ms until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        _PAUSE.wait(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a loopback port; can be stopped and restarted in place."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: the tests need a real one "
                "(`make test` installs it with apt-get when run as root)"
            )
        self.binary = binary
        self.workdir = workdir
        self.extra = extra  # e.g. "--appendonly", "yes" to survive a kill
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        try:
            wait_for(lambda: _pings(client), 10.0, "redis-server to accept connections")
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL: the way a crash or an OOM kill ends Redis."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


Entries = list[tuple[bytes, dict[bytes, bytes]]]


def xrange(client: redis.Redis, key: str) -> Entries:
    """All entries of a stream, typed (redis-py's hints allow None everywhere)."""
    return cast(Entries, client.xrange(key))

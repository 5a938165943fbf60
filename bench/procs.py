"""Subprocesses the benchmark owns (redis-server, generator, forwarder, baseline, drain
client), their CPU and memory from /proc, and small HTTP/wait helpers.

Every process is started through a `Procs` registry whose `close()` kills them all, so a
failing scenario never leaves anything running on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import redis

PAUSE = threading.Event()  # never set: an interruptible pause for polling loops
CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.02
) -> float:
    """Poll until `predicate()` is true; return the seconds it took; raise after `timeout`."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        PAUSE.wait(step)


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """GET (body None) or POST a JSON body; return the decoded JSON reply."""
    data = None if body is None else json.dumps(body).encode()
    # S310: only ever http://127.0.0.1 URLs built by the benchmark itself.
    request = urllib.request.Request(  # noqa: S310
        url, data=data, method="GET" if body is None else "POST"
    )
    # S310: only ever http://127.0.0.1 URLs built by the benchmark itself.
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.load(response)


class ProcStat:
    """CPU time and memory of one process, read from /proc (no psutil dependency)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of every thread so far."""
        text = Path(f"/proc/{self.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def status(self, key: str) -> int:
        """A numeric field of /proc/PID/status (kB values as bytes)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                parts = value.split()
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        raise KeyError(key)

    def rss(self) -> int:
        return self.status("VmRSS")

    def peak_rss(self) -> int:
        return self.status("VmHWM")

    def threads(self) -> int:
        return self.status("Threads")


class CpuMeter:
    """CPU use of several processes over a window, as a percentage of one core."""

    def __init__(self, procs: dict[str, ProcStat]) -> None:
        self._procs = procs
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {name: p.cpu_seconds() for name, p in self._procs.items()}

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        return {
            name: round(100.0 * (p.cpu_seconds() - self._start[name]) / elapsed, 1)
            for name, p in self._procs.items()
        }


class Procs:
    """Owns every subprocess of a run; `close()` kills them all (idempotent)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def spawn(
        self, name: str, argv: Sequence[str], *, stdin: bool = False, stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start `argv`; stderr (and stdout unless piped) go to WORKDIR/NAME.log."""
        log = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else log,
            stderr=log,
            cwd=Path(__file__).absolute().parent.parent,  # the checkout being measured
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


def start_redis(procs: Procs) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on a free loopback port, persistence off."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make bench installs it as root)")
    port = free_port()
    data = procs.workdir / "redis"
    data.mkdir(exist_ok=True)
    proc = procs.spawn(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(pings, 10.0, "redis-server")
    finally:
        client.close()
    return proc, url

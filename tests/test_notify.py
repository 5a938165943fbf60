"""sd_notify: the datagrams systemd receives, read from a real AF_UNIX socket."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.errors import ExitCode
from forwarder.notify import Notifier, format_status, watchdog_interval
from forwarder_sim import Simulator
from tests.helpers import RedisServer, wait_for
from tests.test_cli import metrics_port, write_config

# Longest AF_UNIX path the kernel accepts (sun_path is 108 bytes with the final NUL).
SUN_PATH_MAX = 107
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Listener:
    """The systemd side: a bound datagram socket that records (sender pid, message)."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what goes into NOTIFY_SOCKET
        # Ask the kernel for the sender's credentials, as systemd does for NotifyAccess=.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next datagram and its sender's pid; fails the test after `timeout`."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDS.unpack(payload[: _CREDS.size])[0]
        return pid, data

    def drain(self, until: float) -> list[tuple[int, bytes]]:
        """Every datagram that arrives before the monotonic time `until`."""
        got: list[tuple[int, bytes]] = []
        for _ in range(10_000):  # bounded: a runaway sender cannot keep us here
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                got.append(self.receive(remaining))
            except TimeoutError:
                break
        return got


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A datagram socket bound to a file in tmp_path (or a short temp dir if that is too long)."""
    path = tmp_path / "notify.sock"
    short: tempfile.TemporaryDirectory[str] | None = None
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        short = tempfile.TemporaryDirectory(prefix="notify-")
        path = Path(short.name) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield Listener(sock, str(path))
    sock.close()
    if short is not None:
        short.cleanup()


def test_each_call_sends_its_exact_datagram(listener: Listener) -> None:
    """ready/status/watchdog/stopping/send produce sd_notify(3) datagrams, byte for byte."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    assert notifier.enabled
    assert notifier.ready() is True
    assert notifier.status("12/13 subscriptions connected,\n spool 0") is True
    assert notifier.watchdog() is True
    assert notifier.stopping() is True
    assert notifier.send(STATUS="draining", EXTEND_TIMEOUT_USEC=5_000_000) is True
    assert notifier.extend_timeout(2.5) is True
    expected = [
        b"READY=1",
        b"STATUS=12/13 subscriptions connected, spool 0",  # one line, whitespace collapsed
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STATUS=draining\nEXTEND_TIMEOUT_USEC=5000000",
        b"EXTEND_TIMEOUT_USEC=2500000",
    ]
    for want in expected:
        pid, data = listener.receive()
        assert data == want
        assert pid == os.getpid()  # what systemd's NotifyAccess=main compares
    notifier.close()


def test_reloading_carries_the_monotonic_clock(listener: Listener) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC read from CLOCK_MONOTONIC at the call."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    _, data = listener.receive()
    first, second = data.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, usec = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(usec) <= after
    notifier.close()


def test_abstract_namespace_address() -> None:
    """NOTIFY_SOCKET=@name reaches a socket bound in the abstract namespace ("\\0name")."""
    name = f"forwarder-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        listener = Listener(sock, "@" + name)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
        assert notifier.ready() is True
        assert listener.receive() == (os.getpid(), b"READY=1")
        notifier.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    """Not under systemd (no or empty NOTIFY_SOCKET, or an unusable address): False, no error."""
    for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        notifier = Notifier.from_env(environ)
        assert not notifier.enabled
        assert notifier.ready() is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
        assert notifier.send(READY=1) is False
        notifier.close()


def test_send_failure_returns_false_and_logs_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket path nobody listens on: send returns False, logs at DEBUG, never raises."""
    caplog.set_level(logging.DEBUG, logger="forwarder.notify")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    records = [r for r in caplog.records if r.name == "forwarder.notify"]
    assert records
    assert all(r.levelno == logging.DEBUG for r in records)
    assert "READY failed" in records[0].getMessage()
    notifier.close()


def test_close_makes_later_calls_no_ops(listener: Listener) -> None:
    """After close() (idempotent) nothing is sent and every call returns False."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert notifier.ready() is False
    with pytest.raises(TimeoutError):
        listener.receive(timeout=0.2)


def test_programming_errors_raise_value_error(listener: Listener) -> None:
    """A lowercase key or a newline in a send() value is refused before anything is sent."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    with pytest.raises(ValueError, match="upper case"):
        notifier.send(ready=1)
    with pytest.raises(ValueError, match="newline"):
        notifier.send(STATUS="two\nlines")
    assert notifier.send() is False
    with pytest.raises(TimeoutError):
        listener.receive(timeout=0.2)
    notifier.close()


def test_concurrent_senders_each_deliver_whole_datagrams(listener: Listener) -> None:
    """8 threads x 50 notifications through one Notifier: all 400 arrive, none mangled."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    # Keep the receive queue from filling while the threads send (the kernel's default
    # max_dgram_qlen is small); a reader thread collects as they arrive.
    received: list[bytes] = []
    done = threading.Event()

    def reader() -> None:
        for _ in range(400):
            try:
                received.append(listener.receive(10.0)[1])
            except TimeoutError:
                break
        done.set()

    def sender(n: int) -> None:
        for i in range(50):
            assert notifier.status(f"thread {n} message {i}")

    collector = threading.Thread(target=reader)
    collector.start()
    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done.wait(30)
    collector.join(5)
    expected = {f"STATUS=thread {n} message {i}".encode() for n in range(8) for i in range(50)}
    assert len(received) == 400
    assert set(received) == expected
    notifier.close()


def test_watchdog_interval_is_half_the_period_for_this_pid() -> None:
    """WATCHDOG_USEC gives half its period in seconds; WATCHDOG_PID must name this process."""
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "42"}, pid=42) == 0.0005
    # Inherited from a parent that is the watchdog's real owner: not ours.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}) is None
    for bad in ("", "0", "-5", "abc", "1.5", " "):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_PID": me}) is None


def test_format_status_line() -> None:
    """The STATUS= text: connected/total, spool depth, and Redis only when it is failing."""
    assert format_status(12, 13, 0, True) == "12/13 subscriptions connected, spool 0"
    assert (
        format_status(0, 2, 1500, False)
        == "0/2 subscriptions connected, spool 1500, Redis not answering"
    )


class Recorder:
    """Reads a Listener on a thread, as systemd does, so the sender never finds the queue
    full (net.unix.max_dgram_qlen is 10); records (monotonic time, pid, datagram)."""

    def __init__(self, listener: Listener, limit: float = 60.0) -> None:
        self.listener = listener
        self.limit = limit  # seconds: the thread ends by itself even if nobody stops it
        self.messages: list[tuple[float, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-recorder", daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                pid, data = self.listener.receive(0.1)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), pid, data))

    def lines(self, after: float = 0.0, before: float = float("inf")) -> list[bytes]:
        """Every KEY=VALUE assignment received between the two monotonic times, in order."""
        return [
            line
            for at, _, data in list(self.messages)
            if after <= at < before
            for line in data.split(b"\n")
        ]


def test_forwarder_run_notifies_ready_status_watchdog_stopping(
    tmp_path: Path, listener: Listener, simulator: Simulator, redis_server: RedisServer
) -> None:
    """`forwarder run` under Type=notify: READY=1, STATUS=, WATCHDOG=1, then STOPPING=1."""
    config = write_config(tmp_path, simulator, redis_server.url, ["messages.upsert"])
    env = {
        **os.environ,
        "NOTIFY_SOCKET": listener.address,
        "WATCHDOG_USEC": "1000000",  # a ping every 0.5 s: the test sees several quickly
    }
    env.pop("WATCHDOG_PID", None)
    with Recorder(listener) as recorder:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        port = metrics_port(config)
        try:
            wait_for(lambda: _healthz(port), 15, "the metrics endpoint")
            # READY=1 is due once the metrics endpoint is up, whatever the upstream does.
            wait_for(lambda: b"READY=1" in recorder.lines(), 3, "READY=1")
            wait_for(lambda: simulator.stats()["connections_open"] == 1, 15, "connected")
            wanted = b"STATUS=1/1 subscriptions connected, spool 0"
            wait_for(lambda: wanted in recorder.lines(), 5, "a STATUS line saying connected")
            connected_at = time.monotonic()
            wait_for(lambda: b"WATCHDOG=1" in recorder.lines(after=connected_at), 3, "WATCHDOG=1")
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == ExitCode.OK
            wait_for(lambda: b"STOPPING=1" in recorder.lines(after=sigterm_at), 2, "STOPPING=1")
        finally:
            proc.kill()
            proc.communicate()
    assert {pid for _, pid, _ in recorder.messages} == {proc.pid}  # NotifyAccess=main
    lines = recorder.lines()
    keys = [line.split(b"=", 1)[0] for line in lines]
    ready = keys.index(b"READY")
    assert b"READY" not in keys[ready + 1 :]  # once: a second READY=1 means a reload
    assert keys.index(b"STATUS", ready) < keys.index(b"WATCHDOG", ready)
    assert b"STOPPING=1" not in recorder.lines(before=sigterm_at)


def _healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False

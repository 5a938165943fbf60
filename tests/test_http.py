"""The HTTP endpoint under many connections: bounded threads, idle ones closed, scrapes served."""

from __future__ import annotations

import io
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.registry import CollectorRegistry

from forwarder.http import HttpServer
from forwarder.logs import setup_logging
from tests.helpers import wait_for

CAP = 4
SHORT_IDLE = 1.0  # seconds; the default is 10, shortened so the tests do not wait that long
LONG_IDLE = 120.0  # longer than any test: connections stay open until the test closes them

ServerFactory = Callable[[float], HttpServer]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Endpoints on free loopback ports with a cap of CAP connections and the given timeout."""
    started: list[HttpServer] = []

    def make(idle_timeout: float) -> HttpServer:
        http = HttpServer(
            "127.0.0.1",
            0,
            CollectorRegistry(),
            health=lambda: (True, {"healthy": True}),
            ready=lambda: (True, {"ready": True}),
            status=lambda query: (200, {"subscriptions": []}),
            max_connections=CAP,
            idle_timeout=idle_timeout,
        )
        http.start()
        started.append(http)
        return http

    yield make
    for http in started:
        http.stop()
        http.join(5)


def handler_threads(old: frozenset[threading.Thread] = frozenset()) -> int:
    """Connection threads alive now that were not in `old` (a snapshot of earlier threads)."""
    return sum("process_request_thread" in t.name and t not in old for t in threading.enumerate())


def connect(server: HttpServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(30)  # bounds every read: a server that never answers fails the test
    return sock


def get(server: HttpServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_connections_beyond_the_cap_are_refused_at_once(make_server: ServerFactory) -> None:
    """With CAP idle connections holding every thread, 200 more get 503 and are closed at once;
    handler threads never exceed CAP; closing the idle ones frees the slots for scrapes."""
    server = make_server(LONG_IDLE)
    before = frozenset(threading.enumerate())
    held = [connect(server) for _ in range(CAP)]
    try:
        wait_for(lambda: handler_threads(before) == CAP, 10, "every slot to be taken")
        peak = 0
        for _ in range(200):
            with connect(server) as extra:
                answer = read_until_closed(extra)
            peak = max(peak, handler_threads(before))
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert answer.endswith(b"forwarder: too many connections\r\n")
        assert peak == CAP
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: handler_threads(before) == 0, 10, "the held connections' threads to end")
    assert get(server, "/metrics") == 200


def test_idle_connections_are_closed_and_their_threads_freed(make_server: ServerFactory) -> None:
    """Connections that never send a request are closed by the server after the idle timeout,
    so they cannot hold the endpoint's threads forever; scrapes work again afterwards."""
    server = make_server(SHORT_IDLE)
    before = frozenset(threading.enumerate())
    idle = [connect(server) for _ in range(CAP)]
    try:
        assert [read_until_closed(sock) for sock in idle] == [b""] * CAP  # closed by the server
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: handler_threads(before) == 0, 10, "the idle connections' threads to end")
    assert get(server, "/healthz") == 200


def test_a_client_that_stops_mid_request_is_cut_after_the_idle_timeout(
    make_server: ServerFactory,
) -> None:
    """A half-sent request line holds its thread only until the idle timeout."""
    server = make_server(SHORT_IDLE)
    with connect(server) as sock:
        sock.sendall(b"GET /metr")
        assert read_until_closed(sock) == b""  # closed by the server, not by our timeout


def test_a_failing_page_is_a_500_and_a_redacted_error_line_not_a_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A page that raises answers 500; its error reaches the log redacted, never stderr raw."""
    stream = io.StringIO()
    handler = setup_logging("INFO", stream)
    secret = "redis://app:hunter2@127.0.0.1:6379/0"

    def broken(query: object) -> tuple[int, dict[str, object]]:
        raise RuntimeError(f"cannot reach {secret}")

    http = HttpServer(
        "127.0.0.1",
        0,
        CollectorRegistry(),
        health=lambda: (True, {"healthy": True}),
        ready=lambda: (True, {"ready": True}),
        status=broken,
    )
    http.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"http://127.0.0.1:{http.port}/status", timeout=10)
        assert failed.value.code == 500
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/healthz", timeout=10) as ok:
            assert ok.status == 200  # the server lives on after the failure
    finally:
        http.stop()
        http.join(5)
        logging.getLogger().removeHandler(handler)
    logged = stream.getvalue()
    assert "/status failed: RuntimeError" in logged
    assert "hunter2" not in logged
    raw = capfd.readouterr()
    assert "Traceback" not in raw.err + raw.out
    assert "hunter2" not in raw.err + raw.out

"""The HTTP endpoint under many connections: bounded threads, idle ones closed, scrapes served."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.registry import CollectorRegistry

from forwarder.http import HttpServer
from tests.helpers import wait_for

CAP = 4
IDLE = 1.0  # seconds; the default is 10, shortened so the test does not wait that long


@pytest.fixture
def server() -> Iterator[HttpServer]:
    """An endpoint on a free loopback port with a small cap and a short idle timeout."""
    http = HttpServer(
        "127.0.0.1",
        0,
        CollectorRegistry(),
        health=lambda: (True, {"healthy": True}),
        ready=lambda: (True, {"ready": True}),
        status=lambda: {"subscriptions": []},
        max_connections=CAP,
        idle_timeout=IDLE,
    )
    http.start()
    yield http
    http.stop()
    http.join(5)


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def get(server: HttpServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; the socket timeout bounds each read."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_idle_connections_neither_pile_up_threads_nor_block_scrapes(server: HttpServer) -> None:
    """200 idle connections: at most CAP handler threads, the rest refused with 503 at once,
    the admitted ones closed after the idle timeout, and then scrapes are answered again."""
    before = handler_threads()
    sockets = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.settimeout(IDLE * 10)  # bounds every read below: a server that never closes
            sockets.append(sock)
        busy_at_peak = handler_threads() - before
        outcomes = [read_until_closed(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    refused = [o for o in outcomes if o.startswith(b"HTTP/1.1 503 ")]
    closed_idle = [o for o in outcomes if o == b""]
    assert busy_at_peak <= CAP
    assert len(refused) >= 200 - CAP
    assert len(refused) + len(closed_idle) == 200
    assert b"too many connections" in refused[0]
    wait_for(lambda: handler_threads() <= before, 10, "the handler threads to end")
    assert get(server, "/healthz") == 200


def test_a_scrape_is_refused_quickly_while_every_slot_is_taken(server: HttpServer) -> None:
    """With CAP idle connections open, a scrape gets 503 at once instead of waiting forever."""
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(CAP)]
    try:
        wait_for(lambda: handler_threads() >= CAP, 10, "every slot to be taken")
        assert get(server, "/metrics") == 503  # answered by the accepting thread
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: get(server, "/metrics") == 200, 10, "a slot to be free again")


def test_a_client_that_stops_mid_request_is_cut_after_the_idle_timeout(
    server: HttpServer,
) -> None:
    """A half-sent request line holds its thread only until the idle timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /metr")
        sock.settimeout(IDLE * 10)
        assert read_until_closed(sock) == b""  # closed by the server, not by our timeout

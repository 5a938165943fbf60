"""The handshake pool (the limiter's pace, slow handshakes, errors, stopping, token claims) and
the connector over real sockets (early frames, redirects, silence)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.backoff import AttemptLimiter
from forwarder.config import Secret, SourceConfig, Subscription, TokenRef
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.handshake import (
    Connection,
    Handshake,
    HandshakeJob,
    HandshakePool,
    subscription_url,
    websocket_connect,
    ws_endpoint,
)
from forwarder.upgrade import accept_value
from forwarder_sim import encode_frame, mint_token
from tests.helpers import wait_for

SECRET = "unit-secret"


class FakeConn:
    """What a connector leaves after a handshake: the socket and the bytes read past the 101."""

    def __init__(self, sock: socket.socket | None, early: bytes = b"") -> None:
        self.sock = sock
        self.early = early


def subscription(token: TokenRef | None = None, event: str = "messages.upsert") -> Subscription:
    src = SourceConfig(
        name="main",
        url="ws://127.0.0.1:9/ws/events",
        token=token or TokenRef(value=Secret(mint_token("main", SECRET)), origin="unit"),
    )
    return Subscription(src, event, event, f"{event}:dlq")


class Results:
    """Collects delivered handshakes (from worker threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, Handshake]] = []

    def job(self, tag: str, sub: Subscription | None = None) -> HandshakeJob:
        def deliver(result: Handshake) -> None:
            with self.lock:
                self.items.append((tag, result))

        return HandshakeJob(sub or subscription(), deliver)

    def tags(self) -> list[str]:
        with self.lock:
            return [tag for tag, _ in self.items]


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def test_attempts_are_paced_by_the_shared_limiter(pairs: list[socket.socket]) -> None:
    """10 attempts through a 20/s limiter with a burst of 2 cannot take less than 0.4 s."""
    times: list[float] = []

    def connect(url: str, timeout: float) -> Connection:
        times.append(time.monotonic())
        client, server = socket.socketpair()
        pairs.extend((client, server))
        return FakeConn(client)

    pool = HandshakePool(4, AttemptLimiter(20.0, 2), connect)
    results = Results()
    pool.start()
    try:
        for n in range(10):
            pool.submit(results.job(str(n)))
        wait_for(lambda: len(results.tags()) == 10, 10.0, "ten handshakes")
    finally:
        pool.stop()
        pool.join(2.0)
    assert max(times) - min(times) >= 0.4 - 0.05  # (10 - burst) / rate, less timer slack
    assert all(r.sock is not None and r.error is None for _, r in results.items)


def test_a_slow_handshake_does_not_hold_the_others(pairs: list[socket.socket]) -> None:
    """One server that never answers occupies one worker; the other attempts go through."""
    release = threading.Event()

    def connect(url: str, timeout: float) -> Connection:
        if "event=call.upsert" in url:
            release.wait(10.0)
            raise ConnectFailed("TimeoutError: timed out")
        client, server = socket.socketpair()
        pairs.extend((client, server))
        return FakeConn(client)

    pool = HandshakePool(2, AttemptLimiter(1000.0, 100), connect)
    results = Results()
    pool.start()
    try:
        pool.submit(results.job("slow", subscription(event="call.upsert")))
        for n in range(5):
            pool.submit(results.job(str(n)))
        wait_for(lambda: len(results.tags()) == 5, 5.0, "the five quick ones")
        assert "slow" not in results.tags()
        release.set()
        wait_for(lambda: "slow" in results.tags(), 5.0, "the slow one's failure")
    finally:
        release.set()
        pool.stop()
        pool.join(2.0)
    slow = dict(results.items)["slow"]
    assert isinstance(slow.error, ConnectFailed)
    assert slow.sock is None


def test_errors_are_delivered_with_the_token_expiry_and_never_the_token(tmp_path: Path) -> None:
    """A refused upgrade comes back with the token's exp; an unreadable token as ConfigError."""
    token = mint_token("main", SECRET, expires_in=600, now=1_800_000_000)

    def connect(url: str, timeout: float) -> Connection:
        assert f"token={token}" in url  # the URL carries it; the errors must not
        raise HandshakeRejected(401)

    pool = HandshakePool(1, AttemptLimiter(1000.0, 100), connect)
    results = Results()
    missing = TokenRef(file=tmp_path / "nope", origin=f"token_file {tmp_path / 'nope'}")
    pool.start()
    try:
        pool.submit(results.job("401", subscription(TokenRef(value=Secret(token), origin="u"))))
        pool.submit(results.job("file", subscription(missing)))
        wait_for(lambda: len(results.tags()) == 2, 5.0, "two answers")
    finally:
        pool.stop()
        pool.join(2.0)
    by_tag = dict(results.items)
    assert isinstance(by_tag["401"].error, HandshakeRejected)
    assert by_tag["401"].token_expires_at == 1_800_000_600.0
    assert isinstance(by_tag["file"].error, ConfigError)
    assert all(token not in str(r.error) for r in by_tag.values())


def test_stop_drops_queued_and_cancelled_jobs(pairs: list[socket.socket]) -> None:
    """After stop() nothing queued is attempted; a cancelled job is skipped; a handshake that
    completes after stop() has its socket closed."""
    gate = threading.Event()
    started = threading.Event()
    attempted: list[str] = []
    made: list[socket.socket] = []

    def connect(url: str, timeout: float) -> Connection:
        attempted.append(url.split("event=")[1].split("&", maxsplit=1)[0])
        started.set()
        gate.wait(10.0)
        client, server = socket.socketpair()
        pairs.append(server)
        made.append(client)
        return FakeConn(client)

    pool = HandshakePool(1, AttemptLimiter(1000.0, 100), connect)
    results = Results()
    pool.start()
    cancelled = results.job("cancelled", subscription(event="chats.upsert"))
    cancelled.cancelled = True
    try:
        pool.submit(results.job("first"))
        assert started.wait(5.0)
        pool.submit(cancelled)
        pool.submit(results.job("queued", subscription(event="call.upsert")))
        pool.stop()
        gate.set()
        wait_for(lambda: results.tags() == ["first"], 5.0, "the one in flight")
    finally:
        gate.set()
        pool.join(2.0)
    assert attempted == ["messages.upsert"]
    result = dict(results.items)["first"]
    assert (result.sock, type(result.error)) == (None, ConnectFailed)
    assert made[0].fileno() == -1  # closed, not leaked


def test_subscription_url_quotes_event_and_token() -> None:
    """The upgrade URL: the source URL, then event and token, both percent-encoded."""
    sub = subscription(TokenRef(value=Secret("a.b.c"), origin="u"), event="messages.upsert")
    assert subscription_url(sub, Secret("a.b+c")) == (
        "ws://127.0.0.1:9/ws/events?event=messages.upsert&token=a.b%2Bc"
    )


class RawServer:
    """A TCP server on loopback that reads one upgrade request per connection and answers
    with `reply(request)` in one write (None: say nothing)."""

    def __init__(self, reply: Callable[[bytes], bytes | None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._reply = reply
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            answer = self._reply(request)
            if answer is not None:
                conn.sendall(answer)

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            conn.close()


def _accept_for(request: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    return accept_value(key)


def test_frames_sent_with_the_101_come_back_as_early_bytes() -> None:
    """A server that sends its first frame in the same segment as the 101: the frame is
    returned with the socket, not lost with the read that took the headers."""
    frame = encode_frame(b'{"n":1}')

    def reply(request: bytes) -> bytes:
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + _accept_for(request) + b"\r\n\r\n" + frame
        )

    server = RawServer(reply)
    try:
        conn = websocket_connect(f"ws://127.0.0.1:{server.port}/ws/events?event=e&token=t", 5.0)
        assert conn.early == frame
        assert conn.sock is not None
        assert conn.sock.gettimeout() is None  # blocking, for the loop to switch
        conn.sock.close()
    finally:
        server.close()


def test_a_redirect_is_a_rejection_and_is_not_followed() -> None:
    """302 with a Location: HandshakeRejected(302), and no second connection anywhere."""
    server = RawServer(lambda _: b"HTTP/1.1 302 Found\r\nLocation: ws://127.0.0.1:9/\r\n\r\n")
    try:
        with pytest.raises(HandshakeRejected) as info:
            websocket_connect(f"ws://127.0.0.1:{server.port}/ws/events?event=e&token=t", 5.0)
        assert info.value.status == 302
        assert server.accepted == 1
    finally:
        server.close()


def test_a_server_that_never_answers_times_out_within_the_connect_timeout() -> None:
    """TCP accepted, the upgrade never answered: ConnectFailed after the timeout, no hang."""
    server = RawServer(lambda _: None)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectFailed, match="timed out"):
            websocket_connect(f"ws://127.0.0.1:{server.port}/ws/events?event=e&token=t", 0.3)
        assert time.monotonic() - started < 5.0
    finally:
        server.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://h/ws/events?event=e&token=t", ("h", 80, "h", "/ws/events?event=e&token=t", False)),
        ("wss://H.example:443/p?x=1", ("h.example", 443, "h.example", "/p?x=1", True)),
        (
            "ws://127.0.0.1:8084/ws/events",
            ("127.0.0.1", 8084, "127.0.0.1:8084", "/ws/events", False),
        ),
        ("wss://[::1]:8443/ws", ("::1", 8443, "[::1]:8443", "/ws", True)),
        ("ws://[fe80::1]?event=e", ("fe80::1", 80, "[fe80::1]", "/?event=e", False)),
    ],
)
def test_the_url_gives_host_port_host_header_and_target(
    url: str, expected: tuple[str, int, str, str, bool]
) -> None:
    """Default ports stay out of the Host header, IPv6 literals keep their brackets there."""
    assert ws_endpoint(url) == expected


@pytest.mark.parametrize("url", ["http://h/ws", "ws:///ws", "ws://h:99999/ws"])
def test_a_url_that_cannot_be_connected_to_fails_without_echoing_it(url: str) -> None:
    """Not ws(s), no host, an impossible port: ConnectFailed, the URL (token) not in it."""
    with pytest.raises(ConnectFailed) as info:
        ws_endpoint(url + "?token=SECRET")
    assert "SECRET" not in str(info.value)

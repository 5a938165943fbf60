"""One reconnecting WebSocket subscription per (source, event).

websocket-client performs the handshake (TLS, proxies, the 101 check); after it we read the
socket ourselves in large chunks through `FrameParser`. We do not use `run_forever`: its
reconnect mode hides close codes and errors (library-pitfalls.md section 1.1), its callbacks
swallow exceptions, and it has no frame size limit.

The reader never waits on Redis: frames go to the spool and the loop returns to `recv`. The
server never pings, so we ping when the connection has been silent for `ping_interval` and
give up when neither a pong nor any other byte arrives within `ping_timeout`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import websocket

from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Secret, Subscription, redact_url
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.frames import FrameParser, Opcode, ProtocolViolation, close_code
from forwarder.spool import DiskSpool, Entry, entry_size
from forwarder.stats import State, SubscriptionStats

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
DROP_LOG_INTERVAL = 10.0  # seconds between two ERROR lines about a full buffer
CLOSE_ECHO_TIMEOUT = 2.0  # how long a stopping subscriber waits for the server's close frame


class Connection(Protocol):
    """What the subscriber needs of a websocket-client `WebSocket` after the handshake."""

    sock: socket.socket | None

    def ping(self, payload: bytes | str = "") -> None: ...
    def pong(self, payload: bytes | str = "") -> None: ...
    def send_close(self, status: int = ..., reason: bytes = ...) -> None: ...


Connector = Callable[[str, float], Connection]


def websocket_connect(url: str, timeout: float) -> Connection:
    """Open a WebSocket with websocket-client; translate its errors into ours.

    The messages of the errors we raise never contain `url` (it holds the token).
    """
    ws: Any = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
    try:
        # suppress_origin: the upstream does not check Origin and a browser-like header
        # serves no purpose for a daemon.
        ws.connect(url, timeout=timeout, suppress_origin=True)
    except websocket.WebSocketBadStatusException as exc:
        ws.shutdown()
        raise HandshakeRejected(int(exc.status_code)) from None
    except (OSError, websocket.WebSocketException) as exc:
        ws.shutdown()
        raise ConnectFailed(_describe(exc)) from None
    return ws  # type: ignore[no-any-return]


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_url(f"{type(exc).__name__}: {text}"[:200])


def close_code_label(code: int) -> str:
    """Metric label for a close code: numeric for standard codes, 4xxx for application ones."""
    if 4000 <= code <= 4999:
        return "4xxx"
    if 1000 <= code <= 3999:
        return str(code)
    return "invalid"


class Subscriber:
    """Owns one thread that keeps one subscription connected and spools what it receives.

    `start()` returns at once. `stop()` asks for a graceful end (a close frame, then the
    server's echo, so frames in flight are still read); `force_stop()` shuts the socket down.
    Both are idempotent and callable from any thread; then `join()`.
    """

    def __init__(
        self,
        index: int,
        subscription: Subscription,
        stats: SubscriptionStats,
        spool: DiskSpool,
        limiter: AttemptLimiter,
        backoff: ReconnectBackoff,
        connect: Connector = websocket_connect,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._index = index
        self._sub = subscription
        self._source = subscription.source
        self._stats = stats
        self._spool = spool
        self._limiter = limiter
        self._backoff = backoff
        self._connect = connect
        self._clock = clock
        self._wall = wall
        self._name = f"{subscription.source.name}/{subscription.event}"
        self._thread = threading.Thread(target=self._run, name=f"sub:{self._name}", daemon=True)
        self._stop = threading.Event()
        # The live connection, shared with stop()/force_stop() on other threads.
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._close_sent = False
        self._last_drop_log = -DROP_LOG_INTERVAL
        self.failed: BaseException | None = None  # set if the thread died of a bug

    @property
    def name(self) -> str:
        return self._name

    @property
    def redacted_url(self) -> str:
        return f"{self._source.url}?event={quote(self._sub.event, safe='')}&token=***"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Begin a graceful stop: no new connection; the current one is closed politely."""
        self._stop.set()
        with self._lock:
            conn = self._conn
            if conn is None or self._close_sent:
                return
            self._close_sent = True
        if self._source.url.startswith("wss:"):
            # OpenSSL objects must not be written while another thread reads them.
            self.force_stop()
            return
        try:
            conn.send_close(1001, b"")  # going away
        except (OSError, websocket.WebSocketException):
            self.force_stop()

    def force_stop(self) -> None:
        """Shut the socket down so a blocked `recv` returns at once."""
        self._stop.set()
        with self._lock:
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- subscriber thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: keep it visible in /healthz and the logs
            self.failed = exc
            log.exception("%s: subscriber thread crashed", self._name)
        finally:
            self._stats.state = State.STOPPED
            self._stats.next_attempt_at = None

    def _loop(self) -> None:
        stats = self._stats
        first = True
        while not self._stop.is_set():
            if not self._limiter.acquire(self._stop):
                return
            if not first:
                stats.reconnects += 1
            first = False
            stats.state = State.CONNECTING
            delay = self._attempt()
            if self._stop.is_set():
                return
            stats.state = State.BACKOFF
            stats.next_attempt_at = self._wall() + delay
            if self._stop.wait(delay):
                return
            stats.next_attempt_at = None

    def _attempt(self) -> float:
        """Connect once and read until the connection ends; return the delay before the next."""
        stats = self._stats
        try:
            token = self._source.token.read()
            conn = self._connect(self._url(token), self._source.connect_timeout)
        except ConfigError as exc:
            stats.last_error = str(exc)
            delay = self._backoff.after_auth_failure()
            log.error("%s: %s; retrying in %.1fs", self._name, exc, delay)
            return delay
        except HandshakeRejected as exc:
            status = str(exc.status)
            stats.handshake_failures[status] = stats.handshake_failures.get(status, 0) + 1
            stats.last_handshake_status = status
            stats.last_error = str(exc)
            if exc.status in (401, 403):
                delay = self._backoff.after_auth_failure()
                log.error(
                    "%s: %s rejected the subscription with HTTP %d: the token is invalid, "
                    "expired or signed with another secret, or the server does not know the "
                    "event name; retrying in %.1fs",
                    self._name,
                    self.redacted_url,
                    exc.status,
                    delay,
                )
            else:
                delay = self._backoff.after_failure()
                log.warning(
                    "%s: handshake failed with HTTP %d; retrying in %.1fs",
                    self._name,
                    exc.status,
                    delay,
                )
            return delay
        except ConnectFailed as exc:
            stats.handshake_failures["error"] = stats.handshake_failures.get("error", 0) + 1
            stats.last_error = str(exc)
            delay = self._backoff.after_failure()
            log.warning(
                "%s: cannot connect to %s (%s); retrying in %.1fs",
                self._name,
                self.redacted_url,
                exc,
                delay,
            )
            return delay

        with self._lock:
            self._conn = conn
            self._close_sent = False
        if self._stop.is_set():  # stop() ran while we were connecting
            self.force_stop()
        started = self._clock()
        stats.last_handshake_status = "101"
        stats.connected_since = self._wall()
        stats.state = State.CONNECTED
        log.info("%s: connected to %s", self._name, self.redacted_url)
        try:
            label, why = self._read(conn)
        finally:
            with self._lock:
                self._conn = None
            stats.connected_since = None
            stats.state = State.CONNECTING
            _close_quietly(conn)
        lasted = self._clock() - started
        self._backoff.connection_lasted(lasted)
        if self._stop.is_set():
            log.info("%s: disconnected (stopping)", self._name)
            return 0.0
        stats.close_codes[label] = stats.close_codes.get(label, 0) + 1
        stats.last_close_code = label
        stats.last_error = why
        delay = self._backoff.after_failure()
        log.info(
            "%s: connection closed after %.1fs (code %s: %s); reconnecting in %.2fs",
            self._name,
            lasted,
            label,
            why,
            delay,
        )
        return delay

    def _url(self, token: Secret) -> str:
        event = quote(self._sub.event, safe="")
        return f"{self._source.url}?event={event}&token={quote(token.reveal(), safe='')}"

    def _read(self, conn: Connection) -> tuple[str, str]:
        """Read frames until the connection ends; return (close code label, explanation)."""
        sock = conn.sock
        if sock is None:
            return "1006", "socket closed during the handshake"
        source = self._source
        parser = FrameParser(source.max_frame_bytes)
        clock = self._clock
        last_rx = clock()
        ping_sent: float | None = None
        stop_seen_at: float | None = None
        while True:
            now = clock()
            if self._stop.is_set():
                # Stopping: we sent a close frame; read until the echo, but not forever.
                if stop_seen_at is None:
                    stop_seen_at = now
                deadline = stop_seen_at + CLOSE_ECHO_TIMEOUT
                if now >= deadline:
                    return "1006", "no close echo from the server"
            elif ping_sent is None:
                deadline = last_rx + source.ping_interval
            else:
                deadline = ping_sent + source.ping_timeout
            if parser.mid_message:
                deadline = min(deadline, last_rx + source.read_timeout)
            sock.settimeout(max(0.01, deadline - now))
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError:
                now = clock()
                if parser.mid_message and now - last_rx >= source.read_timeout:
                    return "1006", f"stalled for {source.read_timeout:g}s in the middle of a frame"
                if ping_sent is not None and now - ping_sent >= source.ping_timeout:
                    return "1006", f"no pong within {source.ping_timeout:g}s"
                idle = now - last_rx >= source.ping_interval
                if ping_sent is None and idle and not self._stop.is_set():
                    ping_sent = now
                    try:
                        conn.ping(b"")
                    except (OSError, websocket.WebSocketException) as exc:
                        return "1006", f"ping failed: {_describe(exc)}"
                continue
            except OSError as exc:
                return "1006", _describe(exc)
            if not data:
                return "1006", "the server closed the TCP connection without a close frame"
            last_rx = clock()
            ping_sent = None  # any byte shows the peer is alive
            try:
                messages = parser.feed(data)
            except ProtocolViolation as exc:
                self._send_close(conn, 1002)
                return "1002", f"protocol error: {exc}"
            received_at = self._wall()
            entries: list[Entry] = []
            for opcode, payload in messages:
                if opcode >= Opcode.CLOSE:
                    assert isinstance(payload, bytes)
                    if opcode == Opcode.CLOSE:
                        self._store(entries)
                        code = close_code(payload)
                        self._send_close(conn, code)
                        reason = payload[2:125].decode("utf-8", "replace")
                        return close_code_label(code), f"closed by the server: {code} {reason}"
                    if opcode == Opcode.PING:
                        # A failure here shows up as an error on the next recv.
                        with contextlib.suppress(OSError, websocket.WebSocketException):
                            conn.pong(payload)
                    continue
                entries.append(Entry(self._index, opcode, payload, received_at))
            if entries:
                self._store(entries)

    def _store(self, entries: list[Entry]) -> None:
        if not entries:
            return
        stats = self._stats
        nbytes = sum(entry_size(e) for e in entries)
        stats.received += len(entries)
        stats.received_bytes += nbytes
        stats.last_message_at = entries[-1].received_at
        if self._spool.append(entries, nbytes):
            return
        stats.dropped += len(entries)
        now = self._clock()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            pending, pending_bytes = self._spool.pending()
            log.error(
                "%s: buffer full (%d frames, %d bytes waiting for Redis): dropped %d frames; "
                "%d dropped so far (forwarder_messages_dropped_total)",
                self._name,
                pending,
                pending_bytes,
                len(entries),
                stats.dropped,
            )
        entries.clear()

    def _send_close(self, conn: Connection, code: int) -> None:
        with self._lock:
            if self._close_sent:
                return
            self._close_sent = True
        if not (1000 <= code <= 4999) or code in (1005, 1006, 1015):
            code = 1000
        with contextlib.suppress(OSError, websocket.WebSocketException):
            conn.send_close(code, b"")  # the connection is ending anyway


def _close_quietly(conn: Connection) -> None:
    sock = conn.sock
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.close()
    conn.sock = None

"""The HTTP endpoint: /metrics, /healthz, /readyz and /status on one loopback port.

prometheus-client's WSGI app serves /metrics; the rest is a small router over the same
stats. Served by wsgiref in a thread per connection, so a slow scrape never blocks the
others, within two bounds: a connection that sends or reads nothing for IDLE_TIMEOUT seconds
is closed (without it, each idle connection held a thread forever), and at most
MAX_CONNECTIONS are served at once; beyond that a connection is answered 503 and closed at
once by the accepting thread, so neither threads nor memory grow with the connections.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIEnvironment

import orjson
from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from forwarder.errors import ConfigError

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, dict[str, Any]]]
# /status: query parameters -> (HTTP status code, document).
StatusPage = Callable[[Mapping[str, Sequence[str]]], tuple[int, dict[str, Any]]]

IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent (request or response) before close
MAX_CONNECTIONS = 32  # connections served at once; a scrape every few seconds needs one or two
REFUSED_LOG_INTERVAL = 60.0  # seconds between two WARNINGs about refused connections
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 33\r\n"
    b"Connection: close\r\n\r\nforwarder: too many connections\r\n"
)


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's server with one thread per connection, at most `max_connections` of them.

    `process_request` runs in the accepting thread: it takes a slot or refuses the connection
    without blocking; the slot is given back when the connection's thread ends.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: a burst of connections waits to be refused

    def __init__(self, address: tuple[str, int], max_connections: int, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout  # read by _QuietHandler.setup
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._refused = 0  # connections refused since the last WARNING (accepting thread only)
        self._refused_logged_at = -REFUSED_LOG_INTERVAL
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)  # the accepting thread never waits on a client
            request.send(_BUSY)
            # Read what already arrived (a request): closing with unread data would answer
            # with a reset, which can make the client lose the 503.
            request.recv(65536)
        except OSError:
            pass  # nothing to read, or a full or reset socket: closing it is answer enough
        self.shutdown_request(request)
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_LOG_INTERVAL:
            log.warning(
                "metrics endpoint: %d connections are open, the limit: refused %d since the "
                "last such message (idle connections are closed after %.0f s)",
                self._max_connections,
                self._refused,
                self.idle_timeout,
            )
            self._refused = 0
            self._refused_logged_at = now

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away: normal for HTTP, not worth a traceback."""
        log.debug("metrics endpoint: connection from %s ended with an error", client_address)


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        # Reading the request and writing the response each fail after this long without
        # progress, which ends the connection and frees its thread.
        server = self.server
        assert isinstance(server, _Server)
        self.connection.settimeout(server.idle_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs would be one line per scrape: not worth journald's space."""


class HttpServer:
    """Owns the server thread. `start()` binds (raising ConfigError if it cannot) and returns."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Check,
        ready: Check,
        status: StatusPage,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._ready = ready
        self._status = status
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_port)

    def start(self) -> None:
        try:
            server = _Server((self._host, self._port), self._max_connections, self._idle_timeout)
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from None
        server.set_app(self._app)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name="http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer one request; a failing page is a 500 and one ERROR line, never a traceback.

        wsgiref would print the traceback to stderr itself, bypassing the log redaction (an
        exception's text can carry a Redis URL or a token), so the error is caught here.
        """
        try:
            return self._route(environ, start_response)
        except Exception as exc:  # any page bug: it must not reach wsgiref
            path = environ.get("PATH_INFO", "")
            log.error("http: %s failed: %s: %s", path, type(exc).__name__, exc)
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain")],
                sys.exc_info(),
            )
            return [b"internal error: see the forwarder's log\n"]

    def _route(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return _json(start_response, *self._health())
        if path == "/readyz":
            return _json(start_response, *self._ready())
        if path == "/status":
            code, doc = self._status(parse_qs(environ.get("QUERY_STRING", "")))
            return _json(start_response, code == 200, doc, code)
        if path == "/":
            body = b"forwarder: /metrics /healthz /readyz /status\n"
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]


_REASONS = {200: "200 OK", 400: "400 Bad Request", 503: "503 Service Unavailable"}


def _json(
    start_response: StartResponse, ok: bool, body: dict[str, Any], code: int | None = None
) -> list[bytes]:
    data = orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    status = _REASONS[code] if code is not None else "200 OK" if ok else "503 Service Unavailable"
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]

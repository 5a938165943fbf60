"""The HTTP endpoint: /metrics, /healthz, /readyz and /status on one loopback port.

prometheus-client's WSGI app serves /metrics; the rest is a small router over the same
stats. Served by wsgiref in a thread per request, so a slow scrape never blocks the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import orjson
from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from forwarder.errors import ConfigError

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, dict[str, Any]]]
# /status: query parameters -> (HTTP status code, document).
StatusPage = Callable[[Mapping[str, Sequence[str]]], tuple[int, dict[str, Any]]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
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
    ) -> None:
        self._host = host
        self._port = port
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._ready = ready
        self._status = status
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_port)

    def start(self) -> None:
        try:
            server = make_server(
                self._host, self._port, self._app, server_class=_Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from None
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

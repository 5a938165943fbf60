"""The WebSocket handshake: websocket-client in a small pool of threads.

websocket-client does what we do not want to write ourselves: TCP connect (and HTTP proxies),
TLS with certificate checks, the upgrade request and the 101 check. It blocks while doing it,
so handshakes run in a bounded pool of worker threads, never on an I/O loop: a slow or silent
server holds a worker (at most `connect_timeout`), never the reading of other sockets. Every
attempt first takes a token from the shared `AttemptLimiter`, so however many subscriptions
want to connect at once (a start, an upstream restart), the upstream sees at most `rate`
attempts per second. The connected socket goes back to the loop that asked; we never use
websocket-client's reading side (see frames.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import websocket

from forwarder.backoff import AttemptLimiter
from forwarder.config import Secret, Subscription, redact_url
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.tls import tls_context
from forwarder.tokens import token_expiry

log = logging.getLogger(__name__)


class Connection(Protocol):
    """What we need of a websocket-client `WebSocket` after its handshake: the socket."""

    sock: socket.socket | None


Connector = Callable[[str, float], Connection]


def websocket_connect(
    url: str, timeout: float, *, ssl_context: ssl.SSLContext | None = None
) -> Connection:
    """Open a WebSocket with websocket-client; translate its errors into ours.

    `ssl_context` is used for wss:// URLs (see `tls_context`); None means websocket-client's
    default, which verifies against the system trust store. The messages of the errors we
    raise never contain `url` (it holds the token).
    """
    ws: Any = websocket.WebSocket(
        skip_utf8_validation=True,
        sslopt={"context": ssl_context} if ssl_context is not None else None,
    )
    try:
        # suppress_origin: the upstream does not check Origin and a browser-like header
        # serves no purpose for a daemon.
        ws.connect(url, timeout=timeout, suppress_origin=True)
    except websocket.WebSocketBadStatusException as exc:
        ws.shutdown()
        raise HandshakeRejected(int(exc.status_code)) from None
    except ssl.SSLCertVerificationError as exc:
        ws.shutdown()
        raise ConnectFailed(
            f"TLS: the server's certificate was refused ({exc.verify_message}): check the "
            "source's ca_file and that the host name in its url is one the certificate names"
        ) from None
    except ssl.SSLError as exc:
        ws.shutdown()
        raise ConnectFailed(
            f"TLS handshake failed ({describe(exc)}); if the server requires a client "
            "certificate, set client_cert (and client_key)"
        ) from None
    except websocket.WebSocketConnectionClosedException as exc:
        ws.shutdown()
        hint = ""
        if url.startswith("wss:"):
            # TLS 1.3 servers check the client certificate after our side of the handshake.
            hint = (
                "; over TLS this is also how a server refuses a missing or untrusted client "
                "certificate (client_cert)"
            )
        raise ConnectFailed(describe(exc) + hint) from None
    except (OSError, websocket.WebSocketException) as exc:
        ws.shutdown()
        raise ConnectFailed(describe(exc)) from None
    return ws  # type: ignore[no-any-return]


def describe(exc: BaseException) -> str:
    """An exception as one short line without secrets (URLs with a token are redacted)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_url(f"{type(exc).__name__}: {text}"[:200])


def subscription_url(sub: Subscription, token: Secret) -> str:
    """The upgrade URL: the source's URL with `event` and `token` (holds the secret)."""
    event = quote(sub.event, safe="")
    return f"{sub.source.url}?event={event}&token={quote(token.reveal(), safe='')}"


@dataclass(frozen=True, slots=True)
class Handshake:
    """The outcome of one attempt: a connected, still blocking socket, or the error."""

    sock: socket.socket | None
    error: ConfigError | HandshakeRejected | ConnectFailed | None
    token_expires_at: float | None  # the exp claim of the token used, None if unknown


@dataclass(eq=False)
class HandshakeJob:
    """One connection attempt. `deliver` is called exactly once, from a worker thread, unless
    the pool stops first. `cancelled` may be set by any thread (a plain bool: the worker reads
    it before starting, and a late result for a cancelled job is still delivered, for the
    owner to close)."""

    subscription: Subscription
    deliver: Callable[[Handshake], None]
    cancelled: bool = False


class HandshakePool:
    """`workers` threads doing handshakes, in submission order, at the limiter's pace.

    `submit` is thread-safe and never blocks. `stop()` drops queued jobs and wakes workers
    waiting for the limiter; a handshake in flight ends by itself within `connect_timeout`
    (websocket-client offers no way to interrupt it) and its socket is then closed. `join()`
    waits a bounded time: the workers are daemon threads, so one stuck in a slow handshake
    never holds up the exit.
    """

    def __init__(
        self,
        workers: int,
        limiter: AttemptLimiter,
        connect: Connector = websocket_connect,
    ) -> None:
        self._limiter = limiter
        self._connect = connect
        self._jobs: queue.SimpleQueue[HandshakeJob | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"handshake-{i}", daemon=True)
            for i in range(workers)
        ]
        self.failed: BaseException | None = None  # a worker died of a bug

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: HandshakeJob) -> None:
        self._jobs.put(job)

    def queued(self) -> int:
        return self._jobs.qsize()

    def stop(self) -> None:
        """Drop queued jobs and wake the workers. Non-blocking."""
        self._stop.set()
        for _ in self._threads:
            self._jobs.put(None)

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            if thread.ident is not None:  # a shutdown before start() joins nothing
                thread.join(timeout)

    def is_alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def _work(self, index: int) -> None:
        try:
            while not self._stop.is_set():
                job = self._jobs.get()
                if job is None or self._stop.is_set():
                    return
                if job.cancelled:
                    continue
                if not self._limiter.acquire(self._stop):
                    return
                job.deliver(self._attempt(job))
        except BaseException as exc:  # a bug: keep it visible in /healthz and the logs
            self.failed = exc
            log.exception("handshake worker %d crashed", index)

    def _attempt(self, job: HandshakeJob) -> Handshake:
        """Read the token, open the connection; never raises our errors, only returns them."""
        sub = job.subscription
        try:
            token = sub.source.token.read()
        except ConfigError as exc:
            return Handshake(None, exc, None)
        exp = token_expiry(token)
        try:
            context = tls_context(sub.source)
            url = subscription_url(sub, token)
            if context is not None and self._connect is websocket_connect:
                conn = websocket_connect(url, sub.source.connect_timeout, ssl_context=context)
            else:  # an injected connector (tests) does its own TLS
                conn = self._connect(url, sub.source.connect_timeout)
        except (HandshakeRejected, ConnectFailed) as exc:
            return Handshake(None, exc, exp)
        sock, conn.sock = conn.sock, None  # ours from now on, not websocket-client's
        if sock is None:
            return Handshake(None, ConnectFailed("socket closed during the handshake"), exp)
        if self._stop.is_set():
            with contextlib.suppress(OSError):
                sock.close()
            return Handshake(None, ConnectFailed("stopping"), exp)
        return Handshake(sock, None, exp)

"""The WebSocket handshake, in a small pool of threads.

A handshake is a TCP connect, TLS with certificate checks for wss://, and the upgrade
request and its 101 (upgrade.py, sans-I/O, parsed by h11). It blocks, so handshakes run in a
bounded pool of worker threads, never on an I/O loop: a slow or silent server holds a worker
(at most `connect_timeout`), never the reading of other sockets. Every attempt first takes a
token from the shared `AttemptLimiter`, so however many subscriptions want to connect at once
(a start, an upstream restart), the upstream sees at most `rate` attempts per second. The
connected socket, and the bytes read past the 101's headers, go back to the loop that asked.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

from forwarder.backoff import AttemptLimiter
from forwarder.config import Secret, Subscription, redact_url
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.tls import tls_context
from forwarder.tokens import token_expiry
from forwarder.upgrade import (
    CLOSED_DURING_UPGRADE,
    MAX_RESPONSE_HEAD,
    Accepted,
    ClientUpgrade,
    Rejected,
)

log = logging.getLogger(__name__)

# TLS 1.3 servers check the client certificate after our side of the handshake: a refusal
# shows as the connection closing or being reset during the upgrade.
_CLIENT_CERT_HINT = (
    "; over TLS this is also how a server refuses a missing or untrusted client certificate "
    "(client_cert)"
)
RECV_CHUNK = 4096  # bytes per read of the upgrade response (its headers are ~150 bytes)


class Connection(Protocol):
    """What a connector leaves after a handshake: the socket, and the bytes read past the
    101's headers (the first frames), which the I/O loop reads before the socket."""

    sock: socket.socket | None
    early: bytes


Connector = Callable[[str, float], Connection]

# websocket-client's defaults, kept when we took the handshake over: no Nagle delay for our
# small control frames, and the kernel's keepalive as a second line behind our pings.
SOCKET_OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
]
if hasattr(socket, "TCP_KEEPIDLE"):
    SOCKET_OPTIONS += [
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
    ]


@dataclass(slots=True)
class Upgraded:
    """A connection whose upgrade succeeded (a `Connection`)."""

    sock: socket.socket | None
    early: bytes


def ws_endpoint(url: str) -> tuple[str, int, str, str, bool]:
    """(host, port, Host header, request target, TLS) of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConnectFailed("the source's url is not a ws:// or wss:// URL with a host")
    default = 443 if secure else 80
    try:
        port = parts.port or default
    except ValueError:
        raise ConnectFailed("the source's url has an invalid port") from None
    host = parts.hostname
    header = f"[{host}]" if ":" in host else host
    if port != default:
        header = f"{header}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, header, target, secure


def _left(deadline: float) -> float:
    """Seconds left until `deadline` (monotonic), for the next blocking step."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _upgrade(url: str, timeout: float, ssl_context: ssl.SSLContext | None) -> Upgraded:
    """TCP connect, TLS for wss://, the upgrade; `timeout` bounds each step and the whole.
    Raises OSError and ssl errors as they come (websocket_connect translates them)."""
    host, port, header, target, secure = ws_endpoint(url)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        for level, option, value in SOCKET_OPTIONS:
            sock.setsockopt(level, option, value)
        if secure:
            context = ssl_context or ssl.create_default_context()
            sock.settimeout(_left(deadline))
            sock = context.wrap_socket(sock, server_hostname=host)
        upgrade = ClientUpgrade(header, target)
        sock.settimeout(_left(deadline))
        sock.sendall(upgrade.request)
        for _ in range(MAX_RESPONSE_HEAD):  # each read brings at least one byte
            sock.settimeout(_left(deadline))
            outcome = upgrade.receive(sock.recv(RECV_CHUNK))
            if isinstance(outcome, Accepted):
                sock.settimeout(None)
                return Upgraded(sock, outcome.early)
            if isinstance(outcome, Rejected):
                raise HandshakeRejected(outcome.status)
        raise ConnectFailed("the server's answer to the upgrade never ended")
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise


def websocket_connect(
    url: str, timeout: float, *, ssl_context: ssl.SSLContext | None = None
) -> Connection:
    """Open a WebSocket (TCP, TLS for wss://, the upgrade); translate errors into ours.

    `ssl_context` is used for wss:// URLs (see `tls_context`); None means the system trust
    store with host name checks. Blocks at most about `timeout`. A redirect (3xx) is a
    rejection like any other status: following it would hand the upgrade, token included, to
    wherever the answer points. The messages of the errors we raise never contain `url` (it
    holds the token).
    """
    try:
        return _upgrade(url, timeout, ssl_context)
    except HandshakeRejected:
        raise
    except ConnectFailed as exc:
        if str(exc) == CLOSED_DURING_UPGRADE and url.startswith("wss:"):
            raise ConnectFailed(f"{exc}{_CLIENT_CERT_HINT}") from None
        raise
    except ssl.SSLCertVerificationError as exc:
        raise ConnectFailed(
            f"TLS: the server's certificate was refused ({exc.verify_message}): check the "
            "source's ca_file and that the host name in its url is one the certificate names"
        ) from None
    except ssl.SSLError as exc:
        raise ConnectFailed(
            f"TLS handshake failed ({describe(exc)}); if the server requires a client "
            "certificate, set client_cert (and client_key)"
        ) from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        hint = _CLIENT_CERT_HINT if url.startswith("wss:") else ""
        raise ConnectFailed(describe(exc) + hint) from None
    except OSError as exc:
        raise ConnectFailed(describe(exc)) from None


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
    early: bytes = b""  # read past the 101's headers: the first frames, read before the socket


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
    (a blocking socket read cannot be interrupted) and its socket is then closed. `join()`
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
        sock, conn.sock = conn.sock, None  # ours from now on, not the connector's
        if sock is None:
            return Handshake(None, ConnectFailed("socket closed during the handshake"), exp)
        if self._stop.is_set():
            with contextlib.suppress(OSError):
                sock.close()
            return Handshake(None, ConnectFailed("stopping"), exp)
        return Handshake(sock, None, exp, conn.early)

"""One reconnecting WebSocket subscription per (source, event).

websocket-client performs the handshake (TLS, proxies, the 101 check); after it we read the
socket ourselves in large chunks through `FrameParser`. We do not use `run_forever`: its
reconnect mode hides close codes and errors (library-pitfalls.md section 1.1), its callbacks
swallow exceptions, and it has no frame size limit.

The reader never waits on Redis: frames go to the spool and the loop returns to `recv`. The
server never pings, so we ping when the connection has been silent for `ping_interval` and
give up when neither a pong nor any other byte arrives within `ping_timeout`.

Displacement. The upstream keeps one connection per (instance, event) and a newer one takes
the feed without telling the older, which stays open and receives nothing
(upstream-protocol.md section 5). Pings cannot see that, so a silence watchdog does: no data
frame for `silence_timeout` triggers a make-before-break re-subscribe. We open the new
connection B while the old one A is still open (B takes the feed at once), send a close frame
on A and keep reading A until its close echo, EOF or a short deadline (spooling every data
frame still in flight), and only then read B, whose frames wait in its kernel buffer meanwhile.
So arrival order per stream is kept and nothing in flight is lost. `resubscribe_interval`
does the same periodically.

A quiet event (`call.upsert` can be silent for hours) and a displaced one look the same from
the old connection. What tells them apart is the new one: a re-subscribe counts as a
*displacement* only when the old connection had been silent for at least
EVIDENCE_SILENCE_FACTOR evidence windows, yielded nothing while being drained (frames in
flight there show it held the feed until the switch), and the new one then receives
EVIDENCE_FRAMES data frames within one window W (silence_timeout / 100, between 0.1 and 30 s;
3 s by default): traffic that resumes at once after a long silence was flowing to someone
else. A quiet event shows nothing on either connection and never counts: a Poisson-quiet
event passes the test with probability below 1e-6 per watchdog firing, and a burst of
activity counts only if it starts within W of a re-subscribe (1% of bursts with the
defaults), so a quiet event reaching the flapping threshold is practically impossible.
A confirmed displacement is recorded as a gap; `flap_threshold` of them within `flap_window`
mean another client keeps taking the feed back, and instead of fighting it the watchdog
stands down for `flap_backoff` (doubling on each repeat, up to 8x) after an ERROR naming the
likely cause.

Gap records. Every interval in which the subscription was not receiving goes to the spool as
a GAP entry (`{"start": ms, "end": ms, "cause": ..., ...}`), which the writer appends to the
gap stream. Causes: `close:CODE` (the connection ended; `close:1006` for drops and timeouts),
`startup` (the first connection needed retries), `watchdog`/`periodic` (a displacement found
by that re-subscribe). Disconnections start when the loss was detected, or at the last byte
received for timeouts (ping, stalled frame), and end when the next handshake completed; a
displacement starts at the last data frame received and ends when the new connection took the
feed (the displacement happened somewhere in between: an upper bound).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import orjson
import websocket

from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Secret, SourceConfig, Subscription, redact_url
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.frames import FrameParser, Opcode, close_code
from forwarder.spool import GAP, DiskSpool, Entry, entry_size
from forwarder.stats import State, SubscriptionStats

log = logging.getLogger(__name__)

_CLOSE = int(Opcode.CLOSE)
_PING = int(Opcode.PING)

RECV_BYTES = 256 * 1024
COALESCE_BELOW = 64 * 1024  # bytes: a smaller chunk is followed by COALESCE_PAUSE
COALESCE_PAUSE = 0.001  # seconds
BACKLOG_WAIT = 0.05  # at most this long a reader waits for a lagging (healthy) writer
DROP_LOG_INTERVAL = 10.0  # seconds between two ERROR lines about a full buffer
CLOSE_ECHO_TIMEOUT = 2.0  # how long a closing connection is read for the server's close frame
TOKEN_CHECK_INTERVAL = 60.0  # re-read the token's exp claim this often while connected
# Displacement evidence (see the module docstring).
EVIDENCE_FRAMES = 3  # more than the 2 frames one API send can produce on messages.upsert
EVIDENCE_WINDOW_MIN = 0.1
EVIDENCE_WINDOW_MAX = 30.0
EVIDENCE_SILENCE_FACTOR = 4.0
FLAP_BACKOFF_MAX_FACTOR = 8  # the flap back-off doubles on each repeat, up to this factor


class Connection(Protocol):
    """What the subscriber needs of a websocket-client `WebSocket` after the handshake."""

    sock: socket.socket | None

    def ping(self, payload: bytes | str = "") -> None: ...
    def pong(self, payload: bytes | str = "") -> None: ...
    def send_close(self, status: int = ..., reason: bytes = ...) -> None: ...


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
        enable_multithread=True,
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
            f"TLS handshake failed ({_describe(exc)}); if the server requires a client "
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
        raise ConnectFailed(_describe(exc) + hint) from None
    except (OSError, websocket.WebSocketException) as exc:
        ws.shutdown()
        raise ConnectFailed(_describe(exc)) from None
    return ws  # type: ignore[no-any-return]


# Client TLS contexts, one per set of files (sources with the same files share it), rebuilt
# when a file changes (a renewed client certificate needs no restart).
_tls_lock = threading.Lock()
_tls_contexts: dict[tuple[Path | None, ...], tuple[tuple[int, ...], ssl.SSLContext]] = {}


def tls_context(source: SourceConfig) -> ssl.SSLContext | None:
    """The TLS context of a wss:// source (None for ws://): TLS 1.2 or later, certificate and
    host name verified against `ca_file` (default: the system trust store), and the client
    certificate if configured. Raises ConnectFailed when a file became unusable."""
    if not source.url.startswith("wss:"):
        return None
    files = (source.ca_file, source.client_cert, source.client_key)
    try:
        stamp = tuple(path.stat().st_mtime_ns for path in files if path is not None)
        with _tls_lock:
            cached = _tls_contexts.get(files)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            context = ssl.create_default_context(
                cafile=str(source.ca_file) if source.ca_file else None
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if source.client_cert is not None:
                context.load_cert_chain(source.client_cert, source.client_key, _no_password)
            _tls_contexts[files] = (stamp, context)
            return context
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConnectFailed(f"TLS files of source {source.name}: {_describe(exc)}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ValueError("the private key is encrypted")


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


def token_expiry(token: Secret) -> float | None:
    """The `exp` claim of a JWT, read without verifying the signature; None if absent.

    Never raises and never puts the token into an exception or a log line.
    """
    parts = token.reveal().split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    value = float(exp)
    return value if math.isfinite(value) else None


def evidence_window(silence_timeout: float) -> float:
    """W: how soon traffic must resume on a new connection to show the old one was displaced."""
    if silence_timeout <= 0:
        return EVIDENCE_WINDOW_MAX
    return min(EVIDENCE_WINDOW_MAX, max(EVIDENCE_WINDOW_MIN, silence_timeout / 100.0))


# One WARNING per (source, token) and stage, however many subscriptions read the token.
_expiry_lock = threading.Lock()
_expiry_warned: dict[tuple[str, str], tuple[float, str]] = {}


def _first_expiry_warning(source: str, origin: str, exp: float, stage: str) -> bool:
    with _expiry_lock:
        key = (source, origin)
        previous = _expiry_warned.get(key)
        if previous in ((exp, stage), (exp, "expired")):
            return False
        _expiry_warned[key] = (exp, stage)
        return True


class _Link:
    """One open WebSocket and its read state. Owned by the subscriber thread, except
    `close_sent`, which stop() may set under the subscriber's lock."""

    __slots__ = (
        "close_sent",
        "conn",
        "data_frames",
        "last_data",
        "last_rx",
        "last_rx_wall",
        "opened",
        "opened_wall",
        "parser",
        "ping_sent",
        "retry_at",
    )

    def __init__(self, conn: Connection, max_frame_bytes: int, now: float, wall: float) -> None:
        self.conn = conn
        self.parser = FrameParser(max_frame_bytes)
        self.close_sent = False
        self.opened = now  # monotonic
        self.opened_wall = wall  # unix time the handshake completed: when we took the feed
        self.last_rx = now  # monotonic time of the last byte received
        self.last_rx_wall = wall
        self.last_data = now  # monotonic time of the last data frame (or of the handshake)
        self.ping_sent: float | None = None
        self.retry_at = 0.0  # no re-subscribe before this (monotonic), after a failed one
        self.data_frames = 0


@dataclass(frozen=True)
class _End:
    """A connection ended: close code label, explanation, unix time the feed was lost."""

    label: str
    why: str
    lost_at: float


@dataclass(frozen=True)
class _Resubscribe:
    reason: str  # "silence" or "periodic"


@dataclass
class _Gap:
    """An open interval in which the subscription is not receiving."""

    start: float  # unix time
    cause: str
    detail: str
    attempts: int = 0  # failed connection attempts since
    handshake: str | None = None  # the last failed attempt's status ("401", "error", "token")


@dataclass
class _Probe:
    """Watching a new connection for displacement evidence (see the module docstring)."""

    link: _Link
    cause: str  # "watchdog" or "periodic"
    silent_since: float  # unix time of the last data frame before the re-subscribe
    silent_for: float  # seconds
    until: float  # monotonic end of the evidence window
    frames: int = 0


class Subscriber:
    """Owns one thread that keeps one subscription connected and spools what it receives.

    `start()` returns at once. `stop()` asks for a graceful end (a close frame, then the
    server's echo, so frames in flight are still read); `force_stop()` shuts the sockets down.
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
        # The open connections (two during a make-before-break), shared with stop() and
        # force_stop() on other threads; the list and each link's close_sent are guarded.
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._forced = False  # force_stop() ran: a connection opened later is shut at once
        self._last_drop_log = -DROP_LOG_INTERVAL
        # Subscriber-thread state for gaps, displacement and flapping.
        self._gap: _Gap | None = None
        self._heard_wall = 0.0  # unix time of the last data frame, or of the last (re)connect
        self._probe: _Probe | None = None
        self._displaced_at: collections.deque[float] = collections.deque()
        self._flap_until = -math.inf  # monotonic; the watchdog stands down until then
        self._flap_level = 0
        self._quiet_resubscribes = 0  # consecutive silence re-subscribes that found nothing
        self._next_token_check = 0.0  # monotonic
        self.failed: BaseException | None = None  # set if the thread died of a bug

    @property
    def name(self) -> str:
        return self._name

    @property
    def index(self) -> int:
        """The subscription's index in the spool's routes (and the daemon's stats)."""
        return self._index

    @property
    def subscription(self) -> Subscription:
        return self._sub

    @property
    def redacted_url(self) -> str:
        return f"{self._source.url}?event={quote(self._sub.event, safe='')}&token=***"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Begin a graceful stop: no new connection; open ones are closed politely.

        Non-blocking (one small write per open connection).
        """
        self._stop.set()
        with self._lock:
            links = [link for link in self._links if not link.close_sent]
            for link in links:
                link.close_sent = True
        if not links:
            return
        if self._source.url.startswith("wss:"):
            # OpenSSL objects must not be written while another thread reads them.
            self.force_stop()
            return
        for link in links:
            try:
                link.conn.send_close(1001, b"")  # going away
            except (OSError, websocket.WebSocketException):
                self.force_stop()

    def force_stop(self) -> None:
        """Shut the sockets down so a blocked `recv` returns at once. Non-blocking."""
        self._stop.set()
        with self._lock:
            self._forced = True
            socks = [link.conn.sock for link in self._links]
        for sock in socks:
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
            with contextlib.suppress(Exception):  # never mask the crash being reported
                self._close_gap(self._wall(), recovered=False)
            self._stats.state = State.STOPPED
            self._stats.next_attempt_at = None

    def _loop(self) -> None:
        stats = self._stats
        # Until the first connection we are not receiving either: counted as blind time, and
        # recorded as a gap if the first connection needs retries.
        self._open_gap(self._wall(), "startup", "not connected yet")
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
            conn = self._dial()
        except (ConfigError, HandshakeRejected, ConnectFailed) as exc:
            label, delay = self._dial_failed(exc, resubscribing=False)
            if self._gap is not None:
                self._gap.attempts += 1
                self._gap.handshake = label
            return delay

        link = self._register(conn)
        started = link.opened
        self._close_gap(link.opened_wall, recovered=True)
        self._heard_wall = link.opened_wall
        stats.last_handshake_status = "101"
        stats.connected_since = link.opened_wall
        stats.state = State.CONNECTED
        log.info("%s: connected to %s", self._name, self.redacted_url)
        try:
            end = self._session(link)
        finally:
            with self._lock:
                links, self._links = self._links, []
            for open_link in links:
                _close_quietly(open_link.conn)
            stats.connected_since = None
            stats.state = State.CONNECTING
            self._probe = None
        lasted = self._clock() - started
        self._backoff.connection_lasted(lasted)
        if self._stop.is_set():
            log.info("%s: disconnected (stopping)", self._name)
            return 0.0
        stats.close_codes[end.label] = stats.close_codes.get(end.label, 0) + 1
        stats.last_close_code = end.label
        stats.last_error = end.why
        self._open_gap(end.lost_at, f"close:{end.label}", end.why)
        delay = self._backoff.after_failure()
        log.info(
            "%s: connection closed after %.1fs (code %s: %s); reconnecting in %.2fs",
            self._name,
            lasted,
            end.label,
            end.why,
            delay,
        )
        return delay

    def _dial(self) -> Connection:
        """Read the token and open a connection. Raises ConfigError, HandshakeRejected or
        ConnectFailed (none of which carries the token)."""
        token = self._source.token.read()
        self._token_read(token)
        context = tls_context(self._source)
        if context is not None and self._connect is websocket_connect:
            # An injected connector (tests) does its own TLS.
            return websocket_connect(
                self._url(token), self._source.connect_timeout, ssl_context=context
            )
        return self._connect(self._url(token), self._source.connect_timeout)

    def _dial_failed(self, exc: Exception, resubscribing: bool) -> tuple[str, float]:
        """Count and log a failed connection attempt; return (status label, delay)."""
        stats = self._stats
        stats.last_error = str(exc)
        keeping = "; keeping the current connection" if resubscribing else ""
        if isinstance(exc, ConfigError):
            delay = self._backoff.after_auth_failure()
            log.error("%s: %s%s; retrying in %.1fs", self._name, exc, keeping, delay)
            return "token", delay
        if isinstance(exc, HandshakeRejected):
            status = str(exc.status)
            stats.handshake_failures[status] = stats.handshake_failures.get(status, 0) + 1
            stats.last_handshake_status = status
            if exc.status in (401, 403):
                delay = self._backoff.after_auth_failure()
                log.error(
                    "%s: %s rejected the subscription with HTTP %d: the token is invalid, "
                    "expired or signed with another secret, or the server does not know the "
                    "event name%s%s; retrying in %.1fs",
                    self._name,
                    self.redacted_url,
                    exc.status,
                    self._expired_note(),
                    keeping,
                    delay,
                )
            else:
                delay = self._backoff.after_failure()
                log.warning(
                    "%s: handshake failed with HTTP %d%s; retrying in %.1fs",
                    self._name,
                    exc.status,
                    keeping,
                    delay,
                )
            return status, delay
        stats.handshake_failures["error"] = stats.handshake_failures.get("error", 0) + 1
        delay = self._backoff.after_failure()
        log.warning(
            "%s: cannot connect to %s (%s)%s; retrying in %.1fs",
            self._name,
            self.redacted_url,
            exc,
            keeping,
            delay,
        )
        return "error", delay

    def _expired_note(self) -> str:
        exp = self._stats.token_expires_at
        if exp is None or exp > self._wall():
            return ""
        return f" (this token's exp claim says it expired at {_utc(exp)})"

    def _register(self, conn: Connection) -> _Link:
        link = _Link(conn, self._source.max_frame_bytes, self._clock(), self._wall())
        with self._lock:
            self._links.append(link)
            forced = self._forced
        if forced and conn.sock is not None:  # force_stop() ran while we were connecting
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        return link

    def _release(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        _close_quietly(link.conn)

    def _url(self, token: Secret) -> str:
        event = quote(self._sub.event, safe="")
        return f"{self._source.url}?event={event}&token={quote(token.reveal(), safe='')}"

    # -- a session: one connection, then its make-before-break replacements -------------------

    def _session(self, link: _Link) -> _End:
        """Read `link` and its replacements until the last one ends."""
        while True:
            result = self._read(link)
            if isinstance(result, _End):
                return result
            replacement = self._replace(link, result.reason)
            if replacement is not None:
                link = replacement

    def _replace(self, old: _Link, reason: str) -> _Link | None:
        """Make-before-break: open a new connection, drain the old one, switch.

        Returns the new link, or None (the old one stays) if the new one could not be opened.
        """
        stats = self._stats
        if not self._limiter.acquire(self._stop):
            return None
        try:
            conn = self._dial()
        except (ConfigError, HandshakeRejected, ConnectFailed) as exc:
            _, delay = self._dial_failed(exc, resubscribing=True)
            old.retry_at = self._clock() + delay
            return None
        new = self._register(conn)  # the upstream now sends to the new connection
        silent_for = new.opened - old.last_data
        before = old.data_frames
        end = self._read(old, draining=True)
        assert isinstance(end, _End)  # a draining read never asks for a re-subscribe
        self._release(old)
        drained = old.data_frames - before
        stats.resubscribes[reason] = stats.resubscribes.get(reason, 0) + 1
        self._backoff.reset()  # the upstream just accepted us
        window = evidence_window(self._source.silence_timeout)
        # Frames drained from the old connection show it held the feed until just now: not
        # displaced, whatever the new one receives.
        evidence = silent_for >= EVIDENCE_SILENCE_FACTOR * window and not drained
        if evidence and not self._stop.is_set():
            self._probe = _Probe(
                link=new,
                cause="watchdog" if reason == "silence" else "periodic",
                silent_since=self._heard_wall,
                silent_for=silent_for,
                until=self._clock() + window,
            )
        if reason == "silence":
            self._quiet_resubscribes += 1
            level = logging.INFO if self._quiet_resubscribes == 1 else logging.DEBUG
            log.log(
                level,
                "%s: no data frame for %.0fs: re-subscribed (make-before-break, %d frames "
                "drained from the old connection: %s); a quiet event repeats this every "
                "%.0fs, logged at DEBUG until frames arrive",
                self._name,
                silent_for,
                drained,
                end.why,
                self._source.silence_timeout,
            )
        else:
            log.info(
                "%s: periodic re-subscribe (make-before-break, %d frames drained from the old "
                "connection: %s)",
                self._name,
                drained,
                end.why,
            )
        return new

    def _due_resubscribe(self, link: _Link, now: float) -> tuple[str | None, float]:
        """(the reason a re-subscribe is due now, or None; monotonic time to look again)."""
        source = self._source
        candidates: list[tuple[float, str]] = []
        if source.silence_timeout > 0:
            candidates.append((link.last_data + source.silence_timeout, "silence"))
        if source.resubscribe_interval > 0:
            candidates.append((link.opened + source.resubscribe_interval, "periodic"))
        if not candidates:
            return None, math.inf
        due, reason = min(candidates)
        # Not while standing down after flapping, nor before a failed attempt's back-off.
        due = max(due, link.retry_at, self._flap_until)
        return (reason if now >= due else None), due

    def _read(self, link: _Link, draining: bool = False) -> _End | _Resubscribe:
        """Read frames until the connection ends or a re-subscribe is due.

        `draining`: a replacement holds the feed; send a close frame and read until the
        server's echo, EOF or CLOSE_ECHO_TIMEOUT, spooling every data frame still in flight.
        """
        sock = link.conn.sock
        if sock is None:
            return _End("1006", "socket closed during the handshake", self._wall())
        source = self._source
        parser = link.parser
        clock = self._clock
        closing_since: float | None = None
        while True:
            now = clock()
            stopping = self._stop.is_set()
            if draining or stopping:
                # Close politely and read until the echo, but not forever.
                self._send_close(link, 1001 if stopping else 1000)
                if closing_since is None:
                    closing_since = now
                deadline = closing_since + CLOSE_ECHO_TIMEOUT
                if now >= deadline:
                    return _End("1006", "no close echo from the server", self._wall())
            else:
                reason, due = self._due_resubscribe(link, now)
                if reason is not None:
                    return _Resubscribe(reason)
                if now >= self._next_token_check:
                    self._check_token()
                if link.ping_sent is None:
                    deadline = link.last_rx + source.ping_interval
                else:
                    deadline = link.ping_sent + source.ping_timeout
                deadline = min(deadline, due, self._next_token_check)
            if parser.mid_message:
                deadline = min(deadline, link.last_rx + source.read_timeout)
            sock.settimeout(max(0.01, deadline - now))
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError:
                now = clock()
                if parser.mid_message and now - link.last_rx >= source.read_timeout:
                    return _End(
                        "1006",
                        f"stalled for {source.read_timeout:g}s in the middle of a frame",
                        link.last_rx_wall,
                    )
                if closing_since is not None:
                    continue
                if link.ping_sent is not None and now - link.ping_sent >= source.ping_timeout:
                    return _End(
                        "1006", f"no pong within {source.ping_timeout:g}s", link.last_rx_wall
                    )
                if link.ping_sent is None and now - link.last_rx >= source.ping_interval:
                    link.ping_sent = now
                    try:
                        link.conn.ping(b"")
                    except (OSError, websocket.WebSocketException) as exc:
                        return _End("1006", f"ping failed: {_describe(exc)}", self._wall())
                continue
            except OSError as exc:
                return _End("1006", _describe(exc), self._wall())
            received_at = self._wall()
            if not data:
                return _End(
                    "1006",
                    "the server closed the TCP connection without a close frame",
                    received_at,
                )
            link.last_rx = clock()
            link.last_rx_wall = received_at
            link.ping_sent = None  # any byte shows the peer is alive
            messages = parser.feed(data)
            entries: list[Entry] = []
            for opcode, payload in messages:
                if opcode >= _CLOSE:  # a plain int: an Enum member lookup per frame costs
                    assert isinstance(payload, bytes)
                    if opcode == _CLOSE:
                        self._store(link, entries)
                        code = close_code(payload)
                        self._send_close(link, code)
                        reason_text = payload[2:125].decode("utf-8", "replace")
                        return _End(
                            close_code_label(code),
                            f"closed by the server: {code} {reason_text}",
                            received_at,
                        )
                    if opcode == _PING:
                        # A failure here shows up as an error on the next recv.
                        with contextlib.suppress(OSError, websocket.WebSocketException):
                            link.conn.pong(payload)
                    continue
                entries.append(Entry(self._index, opcode, payload, received_at))
            if parser.error is not None:  # frames before the violation are kept (issue 9)
                self._store(link, entries)
                self._send_close(link, 1002)
                return _End("1002", f"protocol error: {parser.error}", received_at)
            if entries:
                self._store(link, entries)
                if len(data) < COALESCE_BELOW and not draining:
                    # A small chunk under heavy traffic costs as much as a large one (a lock,
                    # a write, a few syscalls): let a millisecond's worth of frames gather
                    # in the socket buffer before the next recv. Adds at most 1 ms latency.
                    self._stop.wait(COALESCE_PAUSE)

    def _store(self, link: _Link, entries: list[Entry]) -> None:
        if not entries:
            return
        stats = self._stats
        link.last_data = link.last_rx
        link.data_frames += len(entries)
        self._heard_wall = entries[-1].received_at
        self._quiet_resubscribes = 0
        probe = self._probe
        if probe is not None and probe.link is link:
            probe.frames += len(entries)
            if link.last_rx > probe.until:
                self._probe = None
            elif probe.frames >= EVIDENCE_FRAMES:
                self._probe = None
                self._displaced(probe)
        nbytes = sum(entry_size(e) for e in entries)
        stats.received += len(entries)
        stats.received_bytes += nbytes
        stats.last_message_at = entries[-1].received_at
        if self._spool.append(entries, nbytes):
            # If the writer is behind while Redis is healthy, let it catch up (bounded; never
            # during an outage). Nothing is lost: the next frames wait in the socket buffer.
            self._spool.wait_for_writer(BACKLOG_WAIT)
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

    def _send_close(self, link: _Link, code: int) -> None:
        with self._lock:
            if link.close_sent:
                return
            link.close_sent = True
        if not (1000 <= code <= 4999) or code in (1005, 1006, 1015):
            code = 1000
        with contextlib.suppress(OSError, websocket.WebSocketException):
            link.conn.send_close(code, b"")  # the connection is ending anyway

    # -- displacement and flapping ------------------------------------------------------------

    def _displaced(self, probe: _Probe) -> None:
        """The new connection proved the old one had been starved: record it, detect flapping."""
        stats = self._stats
        source = self._source
        stats.displacements += 1
        start, end = probe.silent_since, probe.link.opened_wall
        self._emit_gap(start, end, probe.cause, "displaced by another connection", recovered=True)
        closed, since = stats.blind
        stats.blind = (closed + max(0.0, end - start), since)
        log.warning(
            "%s: displaced: the old connection received nothing for %.1fs and traffic resumed "
            "at once on the new one, so another client with the same token had taken this "
            "event's feed (blind from %s to %s, recorded in the gap stream)",
            self._name,
            probe.silent_for,
            _utc(start),
            _utc(end),
        )
        now = self._clock()
        if now - self._flap_until > source.flap_window:
            self._flap_level = 0  # the last flapping episode is long over
        times = self._displaced_at
        times.append(now)
        while times and now - times[0] > source.flap_window:
            times.popleft()
        if len(times) < source.flap_threshold:
            return
        times.clear()
        self._flap_level += 1
        factor = min(2 ** (self._flap_level - 1), FLAP_BACKOFF_MAX_FACTOR)
        pause = source.flap_backoff * factor
        self._flap_until = now + pause
        stats.flapping_until = self._wall() + pause
        log.error(
            "%s: flapping: displaced %d times within %.0fs. The upstream keeps one connection "
            "per instance and event and the newest silently wins, so another client keeps "
            "taking this feed: most likely a second forwarder (or another consumer) using the "
            "same token, or the instance's QR code page (GET /instance/qrcode/{instance}) left "
            "open. Not fighting it: no watchdog re-subscribe for %.0fs (forwarder_flapping); "
            "run exactly one consumer per token",
            self._name,
            source.flap_threshold,
            source.flap_window,
            pause,
        )

    # -- gaps ---------------------------------------------------------------------------------

    def _open_gap(self, start: float, cause: str, detail: str) -> None:
        self._gap = _Gap(start, cause, detail)
        closed, _ = self._stats.blind
        self._stats.blind = (closed, start)

    def _close_gap(self, end: float, recovered: bool) -> None:
        gap = self._gap
        if gap is None:
            return
        self._gap = None
        closed, _ = self._stats.blind
        self._stats.blind = (closed + max(0.0, end - gap.start), None)
        if gap.cause == "startup" and not gap.attempts:
            return  # a first connection that simply worked is not a gap worth a record
        self._emit_gap(
            gap.start, end, gap.cause, gap.detail, recovered, gap.attempts, gap.handshake
        )

    def _emit_gap(
        self,
        start: float,
        end: float,
        cause: str,
        detail: str,
        recovered: bool,
        attempts: int = 0,
        handshake: str | None = None,
    ) -> None:
        record: dict[str, int | str] = {
            "start": int(start * 1000),
            "end": int(max(start, end) * 1000),
            "cause": cause,
            "recovered": int(recovered),
            "attempts": attempts,
            "detail": detail[:200],
        }
        if handshake is not None:
            record["handshake"] = handshake
        entry = Entry(self._index, GAP, orjson.dumps(record), end)
        if not self._spool.append([entry], entry_size(entry)):
            log.warning(
                "%s: buffer full: the gap record %s..%s (%s) could not be kept",
                self._name,
                _utc(start),
                _utc(end),
                cause,
            )

    # -- token expiry -------------------------------------------------------------------------

    def _token_read(self, token: Secret) -> None:
        self._stats.token_expires_at = token_expiry(token)
        self._next_token_check = self._clock() + TOKEN_CHECK_INTERVAL
        self._warn_expiry()

    def _check_token(self) -> None:
        """While connected: re-read the token (a rotated file) and warn ahead of its expiry."""
        self._next_token_check = self._clock() + TOKEN_CHECK_INTERVAL
        with contextlib.suppress(ConfigError):  # the next connection attempt reports it
            self._stats.token_expires_at = token_expiry(self._source.token.read())
        self._warn_expiry()

    def _warn_expiry(self) -> None:
        exp = self._stats.token_expires_at
        warning = self._source.token_expiry_warning
        if exp is None or warning <= 0:
            return
        left = exp - self._wall()
        if left > warning:
            return
        stage = "expired" if left <= 0 else "soon"
        source = self._source
        if not _first_expiry_warning(source.name, source.token.origin, exp, stage):
            return
        if stage == "soon":
            log.warning(
                "source %s: the token (%s) expires at %s, in %.0f min. Open connections survive "
                "it, but every reconnect after it is rejected with HTTP 401: refresh it (PUT "
                "/instance/refreshToken/{instance}) and write the new one to the token file",
                source.name,
                source.token.origin,
                _utc(exp),
                left / 60.0,
            )
        else:
            log.warning(
                "source %s: the token (%s) expired at %s. Reconnects will be rejected with HTTP "
                "401 unless the server ignores expiry (AUTHENTICATION_JWT_EXPIRES_IN=0): "
                "refresh it and write the new one to the token file",
                source.name,
                source.token.origin,
                _utc(exp),
            )


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _close_quietly(conn: Connection) -> None:
    sock = conn.sock
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.close()
    conn.sock = None

"""A local stand-in for CodeChat ``whatsapp-api``'s event WebSocket (``/ws/events``).

``forwarder simulate`` runs it as a process; tests and benchmarks use :class:`Simulator` in
process. It reproduces the upstream behaviour described in docs/upstream.md:

* ``ws://HOST:PORT/ws/events?event=NAME&token=JWT``; checks in upstream order (exact path, both
  params present, token shaped like a JWT, event in ``ListEvents``, HS256 signature and, unless
  ``ignore_expiration``, ``exp``). Every failure is answered with exactly
  ``HTTP/1.1 401 Unauthorized\\r\\n\\r\\n`` and the socket is destroyed.
* No sub-protocol, no permessage-deflate, no Origin check.
* One slot per (instanceName, event): the newest connection takes it silently. The displaced
  socket stays open, answers pings and receives nothing. A dead holder is never removed, so
  frames for its slot are lost until a new connection takes the slot.
* The server never pings and never closes on its own; it answers pings, echoes a client close
  and ignores data frames. Frames are unfragmented, uncompressed text frames of bare JSON.

On top of that it counts exactly what it delivered (the loss oracle for tests), generates
traffic at configured rates, and injects faults on request (methods here and
``POST /control/<name>`` on the same port; ``GET /stats`` returns :meth:`Simulator.stats`).

The server is written directly on asyncio protocols, not a WebSocket library, so that the
rejection and the framing are byte-exact and a single connection can be fed well over 100,000
small frames per second: frames are pre-encoded and written many per ``transport.write``, and
writers wait on the transport's flow control so memory stays bounded.

Threading: :class:`Simulator` runs its event loop in one background thread. Every public method
is thread-safe and may block until the loop has done the work; none may be called from the
loop thread itself (for example from inside a callback running on it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import fcntl
import hashlib
import logging
import re
import socket
import ssl
import struct
import termios
import threading
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from functools import lru_cache
from types import TracebackType
from typing import Any, TypeVar

import jwt
import orjson

from forwarder_sim import payloads
from forwarder_sim.instances import DEV_API_KEY, InstanceTable, RestApi
from forwarder_sim.tokens import JWT_CODEC, mint_token, token_instance_unverified

__all__ = [
    "CONTROLS",
    "REJECT_RESPONSE",
    "WS_PATH",
    "Simulator",
    "encode_frame",
]

log = logging.getLogger(__name__)


#: The only path upstream accepts (no trailing slash, no prefix).
WS_PATH = "/ws/events"

#: Upstream's answer to every failed upgrade: no headers, no body; the socket is then destroyed.
REJECT_RESPONSE = b"HTTP/1.1 401 Unauthorized\r\n\r\n"

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_ALLOWED = frozenset(payloads.ALLOWED_EVENTS)
_SENT = frozenset(payloads.SENT_EVENTS)
# validator.js isJWT (used upstream via class-validator): three url-safe base64 segments.
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}$")
_MAX_HTTP_HEAD = 64 * 1024
_MAX_CLIENT_PAYLOAD = 100 * 1024 * 1024  # ws's default maxPayload (docs/upstream.md §3)
_WRITE_HIGH_WATER = 1024 * 1024  # pause writers above this much unsent data per connection
_BATCH_BYTES = 64 * 1024  # frames are joined into writes of about this size
_DROP_LINGER = 5.0  # after a drop (FIN), wait this long for the client to close before closing
_MAX_CLOSED_RECORDS = 10_000  # closed connections kept in stats
# Stream bytes remembered per connection for reset accounting: more than the asyncio buffer,
# our kernel send queue and the peer's receive queue can ever hold together.
_TRACK_BYTES = 64 * 1024 * 1024
_SIOCOUTQ = termios.TIOCOUTQ  # Linux: unsent + unacknowledged bytes in a TCP send queue

_T = TypeVar("_T")


# --------------------------------------------------------------------------- framing


@lru_cache(maxsize=4096)
def _header(length: int, opcode: int = 1) -> bytes:
    first = 0x80 | opcode  # FIN set: the server never fragments
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_frame(payload: bytes, opcode: int = 1) -> bytes:
    """Return one unmasked, unfragmented server-to-client frame (RFC 6455 §5.2)."""
    return _header(len(payload), opcode) + payload


def _unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    key = int.from_bytes((bytes(mask) * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def _accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()  # noqa: S324


def _close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()[:123]


# --------------------------------------------------------------------------- state


class ConnState(enum.Enum):
    """Lifecycle of one TCP connection."""

    HTTP = "http"  # reading the request
    OPEN = "open"  # upgraded; frames for its slot may be written
    CLOSING = "closing"  # close frame exchanged, drop or reset under way: no more data frames
    CLOSED = "closed"  # TCP gone


class _Slot:
    """Delivery state of one (instance, event) pair. Touched only on the loop thread."""

    __slots__ = (
        "client_closes",
        "connections",
        "delivered",
        "dropped",
        "event",
        "factory",
        "frames",
        "generator",
        "holder",
        "injected",
        "instance",
        "lag_skipped",
        "lock",
        "lost_indices",
        "rate_override",
        "rejected",
        "reset_lost",
        "seq",
    )

    def __init__(self, instance: str, event: str, factory: Callable[[int], bytes]) -> None:
        self.instance = instance
        self.event = event
        self.factory = factory  # seq -> payload bytes
        self.holder: _Conn | None = None  # never cleared, like upstream's Map entry
        self.seq = 0  # last sequence number assigned (delivered or dropped)
        self.delivered = 0
        self.dropped = 0
        self.lag_skipped = 0  # frames a rate generator skipped because it fell > 1 s behind
        self.reset_lost = 0  # frames un-counted from delivered because an RST destroyed them
        self.client_closes: dict[str, int] = {}  # close frames received from clients, by code
        self.lost_indices: set[int] = set()  # positions in ``frames`` destroyed by an RST
        self.connections = 0
        self.rejected = 0
        self.injected: dict[str, int] = {}
        self.rate_override: float | None = None
        self.generator: asyncio.Task[None] | None = None
        # Serialises writers so that wire order equals seq order and frames never interleave.
        self.lock = asyncio.Lock()
        self.frames: list[bytes] | None = None  # delivered payloads when recording


class _Conn(asyncio.Protocol):
    """One accepted TCP connection: HTTP request, then (maybe) a WebSocket. Loop thread only."""

    def __init__(self, sim: Simulator, conn_id: int) -> None:
        self.sim = sim
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.HTTP
        self.buf = bytearray()
        self.slot: _Slot | None = None
        self.delivered = 0
        self.blackholed = False
        self.stalled = False  # a frame was left half-written on purpose: nothing more is sent
        self.mid_frame = False  # a frame is being streamed over several writes
        self.close_sent = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.skip = 0  # payload bytes of an ignored client data frame still to discard
        self.fragmented = False  # inside a fragmented client message
        self.linger: asyncio.TimerHandle | None = None
        self.written = 0  # bytes handed to the transport so far
        self.token_id: str | None = None  # the tokenId claim of the token it connected with
        self.eof_sent = False  # drop shut our sending side down (FIN queued)
        # Recent data-frame writes, so a reset can tell which counted frames never left:
        # (stream offset after the write, slot, frame lengths, index of the first in
        # slot.frames or -1). Trimmed to the last _TRACK_BYTES of the stream.
        self.batches: deque[tuple[int, _Slot, list[int], int]] = deque()
        self.closed = asyncio.Event()
        self.client_close: int | None = None  # the code of the client's close frame, if any

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.sim._conns[self.id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = ConnState.CLOSED
        if self.linger is not None:
            self.linger.cancel()
        self._wake_writers()
        self.closed.set()
        self.sim._conn_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        if self.state is ConnState.HTTP:
            self.buf += data
            self._http_received()
        elif self.slot is not None and self.state is not ConnState.CLOSED:
            self.buf += data
            self._frames_received()
        # Anything else (bytes after a rejection or an HTTP reply) is discarded.

    def eof_received(self) -> bool | None:
        # Keep a half-closed plain HTTP request open until its reply is written; otherwise
        # close our side too (after flushing what is buffered).
        return True if self.slot is None and self.state is ConnState.CLOSING else None

    # -- writing

    @property
    def writable(self) -> bool:
        """True when data frames for the slot may be written (counted as delivered)."""
        return self.state is ConnState.OPEN and not self.blackholed and not self.stalled

    def write(self, data: bytes) -> None:
        """Queue bytes; silently discarded once our side is shut down (drop, close)."""
        if self.transport is None or self.eof_sent or self.transport.is_closing():
            return
        self.transport.write(data)
        self.written += len(data)

    async def drain(self) -> None:
        """Wait until the transport is below its high-water mark or the connection is gone."""
        if self.write_paused and self.state is not ConnState.CLOSED:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.drain_waiters.append(fut)
            await fut

    def _wake_writers(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def send_close(self, code: int, reason: str = "") -> None:
        """Write a close frame (once) and stop sending data frames."""
        if self.state is not ConnState.OPEN or self.close_sent:
            return
        self.state = ConnState.CLOSING
        if not self.stalled:
            self.close_sent = True
            self.write(encode_frame(_close_payload(code, reason), 8))

    def close_tcp(self) -> None:
        """Graceful close: everything already written is flushed, then FIN."""
        if self.transport is not None and self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSING
            self.transport.close()

    def abort_tcp(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- HTTP

    def _http_received(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HTTP_HEAD:
                self._http_reply("431 Request Header Fields Too Large", b"")
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self._http_reply("400 Bad Request", b"")
            return
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if "upgrade" in tokens and "upgrade" in headers:
            # Like Node's http server: an upgrade request goes to the WebSocket code whatever
            # its path; anything left in the buffer is the client's first frames.
            body = bytes(self.buf[end + 4 :])
            self.buf.clear()
            self.sim._upgrade(self, method, target, headers, body)
            return
        length = int(headers.get("content-length", "0") or "0")
        if len(self.buf) < end + 4 + length:
            return  # wait for the body
        body = bytes(self.buf[end + 4 : end + 4 + length])
        self.buf.clear()
        self.state = ConnState.CLOSING  # one request per connection
        task = asyncio.get_running_loop().create_task(
            self.sim._http(self, method, target, body, headers)
        )
        self.sim._tasks.add(task)
        task.add_done_callback(self.sim._tasks.discard)

    def _http_reply(self, status: str, body: bytes, ctype: str = "application/json") -> None:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.write(head + body)
        self.close_tcp()

    def reject(self) -> None:
        """Upstream: ``socket.write('HTTP/1.1 401 Unauthorized\\r\\n\\r\\n'); socket.destroy()``."""
        self.state = ConnState.CLOSING
        self.write(REJECT_RESPONSE)
        # destroy() after a write still sends the queued bytes (they are already in the kernel
        # when the write completes immediately); close() flushes then FINs, which is the same.
        self.close_tcp()

    # -- client frames

    def _frames_received(self) -> None:
        buf = self.buf
        while buf:
            if self.skip:
                n = min(self.skip, len(buf))
                del buf[:n]
                self.skip -= n
                continue
            if len(buf) < 2:
                return
            b0, b1 = buf[0], buf[1]
            fin, opcode, length = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            pos = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            if b0 & 0x70 or not b1 & 0x80:  # RSV bits without an extension, or unmasked
                self._protocol_error(1002)
                return
            if opcode >= 8:
                if not fin or length > 125 or opcode > 10:
                    self._protocol_error(1002)
                    return
                if len(buf) < pos + 4 + length:
                    return
                mask = buf[pos : pos + 4]
                payload = _unmask(buf[pos + 4 : pos + 4 + length], mask)
                del buf[: pos + 4 + length]
                if opcode == 9:
                    self._pong(payload)
                elif opcode == 8:
                    self._close_received(payload)
                    return
                continue
            # Data frames are ignored (upstream registers no message handler), but framing is
            # still checked so a broken client is noticed like ws would.
            if opcode > 2 or (opcode == 0) != self.fragmented:
                self._protocol_error(1002)
                return
            if length > _MAX_CLIENT_PAYLOAD:
                self._protocol_error(1009)
                return
            if len(buf) < pos + 4:
                return
            self.fragmented = not fin
            del buf[: pos + 4]
            self.skip = length

    def _pong(self, payload: bytes) -> None:
        # A pong written while a frame is half-sent would corrupt the stream; a stalled
        # connection stops answering, which is the point of stalling.
        if self.state is ConnState.OPEN and not self.stalled and not self.mid_frame:
            self.write(encode_frame(payload, 10))

    def _close_received(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.client_close = code
        if self.slot is not None:
            closes = self.slot.client_closes
            closes[str(code)] = closes.get(str(code), 0) + 1
        self.buf.clear()
        if self.state is ConnState.OPEN and not self.mid_frame and not self.stalled:
            # ws echoes the peer's code and reason (an empty close gets an empty close).
            self.close_sent = True
            self.write(encode_frame(payload if len(payload) >= 2 else b"", 8))
        self.close_tcp()

    def _protocol_error(self, code: int) -> None:
        self.buf.clear()
        self.send_close(code)
        self.close_tcp()


# --------------------------------------------------------------------------- simulator


class Simulator:
    """The upstream WebSocket server, in a background thread.

    Args:
        secret: HS256 secret tokens must be signed with (upstream ``AUTHENTICATION_JWT_SECRET``).
        host, port: where to listen; port 0 picks a free port (see :attr:`port`).
        rates: frames per second per event name, for every slot of that event.
        default_rate: frames per second for the events upstream really sends (``SENT_EVENTS``)
            that ``rates`` does not name. The other accepted events stay silent, as upstream.
        record: keep every delivered payload (see :meth:`delivered_frames`).
        ignore_expiration: skip the ``exp`` check, like upstream with ``EXPIRES_IN=0``.
        seed: payload seed (``payloads.build``); ``None`` means 0.
        frame_size: if set, generated frames are ``payloads.sized(event, seq, frame_size)``
            instead of ``payloads.build`` (for benchmarks that need a fixed size); events whose
            ``payloads.min_size`` is larger use that minimum instead.
        instances: instance names whose slots exist from the start, so rate traffic is
            generated (and dropped) before anyone connects, like a real busy instance.
            Otherwise a slot comes into existence with its first connection or ``send``.
        ssl_context: a server-side TLS context: serve ``wss://`` (and the HTTP endpoints over
            HTTPS). Set ``verify_mode = ssl.CERT_REQUIRED`` on it to require client
            certificates.
        api_key: the global key ``GET /instance/fetchInstances`` wants in its ``apikey``
            header (upstream ``AUTHENTICATION_GLOBAL_AUTH_TOKEN``). ``instances`` are also
            listed there; :meth:`create_instance`, :meth:`delete_instance` and
            :meth:`rotate_token` change the listing at run time (see instances.py).
    """

    def __init__(
        self,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 0,
        rates: Mapping[str, float] | None = None,
        default_rate: float = 0.0,
        record: bool = False,
        ignore_expiration: bool = True,
        seed: int | None = None,
        *,
        frame_size: int | None = None,
        instances: Iterable[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        api_key: str = DEV_API_KEY,
    ) -> None:
        for event in rates or {}:
            if event not in _ALLOWED:
                raise ValueError(f"unknown event in rates: {event!r}")
        if frame_size is not None and frame_size < 1:
            raise ValueError("frame_size must be positive")
        self._secret = secret
        self._host = host
        self._requested_port = port
        self._rates: dict[str, float] = dict(rates or {})
        self._default_rate = default_rate
        self._record = record
        self._ignore_expiration = ignore_expiration
        self._seed = seed or 0
        self._frame_size = frame_size
        self._initial_instances = list(instances)
        self._ssl_context = ssl_context
        # Everything below is owned by the loop thread once start() has run.
        self._rest = RestApi(InstanceTable(secret), api_key)
        for name in self._initial_instances:
            if name not in self._rest.table:
                self._rest.table.create(name)
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._conns: dict[int, _Conn] = {}
        self._closed_ids: deque[int] = deque()
        self._next_conn_id = 1
        self._rejected = 0
        self._rejected_by_reason: dict[str, int] = {}
        self._bad_requests = 0
        self._reject_rules: list[list[Any]] = []  # [instance|None, event|None, remaining]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started_at = 0.0
        # Set by start(); read by any thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._port = 0
        self._stopped = False
        self._lifecycle = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Simulator:
        """Bind and start serving in a background thread; return once listening.

        Raises ``OSError`` if the address cannot be bound, ``RuntimeError`` if already started.
        """
        with self._lifecycle:
            if self._thread is not None:
                raise RuntimeError("simulator already started")
            ready = threading.Event()
            failure: list[BaseException] = []
            thread = threading.Thread(
                target=self._run_loop, args=(ready, failure), name="simulator", daemon=True
            )
            self._thread = thread
            thread.start()
            ready.wait()
            if failure:
                thread.join()
                self._thread = None
                raise failure[0]
            log.info("simulator listening on %s", self.url)
            return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection (FIN, no close frame) and stop the loop; idempotent.

        Blocks at most about ``timeout`` seconds.
        """
        with self._lifecycle:
            if self._thread is None or self._stopped:
                return
            self._stopped = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # loop already stopping
                    loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout)
            log.info("simulator stopped")

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (valid after :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``ws://HOST:PORT/ws/events``, ``wss://`` with TLS (add ``?event=...&token=...``)."""
        scheme = "wss" if self._ssl_context is not None else "ws"
        return f"{scheme}://{self._host}:{self._port}{WS_PATH}"

    def token(self, instance: str, expires_in: float | None = None) -> str:
        """Mint a token for ``instance`` signed with this simulator's secret."""
        return mint_token(instance, self._secret, expires_in)

    def url_for(self, instance: str, event: str, expires_in: float | None = None) -> str:
        """Full upgrade URL for ``event`` with a fresh token for ``instance``."""
        query = urllib.parse.urlencode({"event": event, "token": self.token(instance, expires_in)})
        return f"{self.url}?{query}"

    def _run_loop(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # handed to start()'s caller, which re-raises it
            failure.append(exc)
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._ashutdown())
            loop.close()

    async def _astart(self) -> None:
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._server = await loop.create_server(
            self._new_conn,
            self._host,
            self._requested_port,
            backlog=4096,
            reuse_address=True,
            ssl=self._ssl_context,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        for instance in self._initial_instances:
            for event in payloads.ALLOWED_EVENTS:
                if self._event_rate(event) > 0:
                    self._slot(instance, event)

    async def _ashutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for slot in self._slots.values():
            if slot.generator is not None:
                slot.generator.cancel()
        for task in list(self._tasks):
            task.cancel()
        conns = [c for c in self._conns.values() if c.state is not ConnState.CLOSED]
        for conn in conns:
            conn.close_tcp()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.closed.wait()) for c in conns], timeout=1)
        for conn in conns:
            if conn.state is not ConnState.CLOSED:
                conn.abort_tcp()
        await asyncio.sleep(0)  # let transports run connection_lost
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        loop = self._loop
        if loop is None or self._thread is None or self._stopped:
            coro.close()
            raise RuntimeError("simulator is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("Simulator methods must not be called from its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # do not leave the work running on the loop behind the caller
            raise

    # ------------------------------------------------------------------ connections

    def _new_conn(self) -> _Conn:
        conn = _Conn(self, self._next_conn_id)
        self._next_conn_id += 1
        return conn

    def _conn_closed(self, conn: _Conn) -> None:
        if conn.slot is None:
            self._conns.pop(conn.id, None)  # never upgraded: nothing to report about it
            return
        self._closed_ids.append(conn.id)
        while len(self._closed_ids) > _MAX_CLOSED_RECORDS:
            old = self._conns.get(self._closed_ids.popleft())
            if old is not None and (old.slot is None or old.slot.holder is not old):
                del self._conns[old.id]  # a dead holder stays: its slot still points at it

    def _reject(self, conn: _Conn, reason: str, slot_key: tuple[str, str] | None = None) -> None:
        self._rejected += 1
        self._rejected_by_reason[reason] = self._rejected_by_reason.get(reason, 0) + 1
        if slot_key is not None:
            self._slot(*slot_key).rejected += 1
        conn.reject()

    def _upgrade(
        self, conn: _Conn, method: str, target: str, headers: dict[str, str], early: bytes
    ) -> None:
        """Run upstream's checks in upstream's order, then ws's own handshake checks."""
        url = urllib.parse.urlsplit(target)
        if url.path != WS_PATH:
            self._reject(conn, "path")
            return
        query = dict(reversed(urllib.parse.parse_qsl(url.query, keep_blank_values=True)))
        event, token = query.get("event", ""), query.get("token", "")
        if not event or not token:
            self._reject(conn, "params")
            return
        if not _JWT_SHAPE.match(token):
            self._reject(conn, "malformed_token")
            return
        if event not in _ALLOWED:
            self._reject(conn, "event")
            return
        guessed = token_instance_unverified(token)
        known = (guessed, event) if guessed is not None else None
        try:
            claims = JWT_CODEC.decode(
                token,
                self._secret,
                algorithms=["HS256", "HS384", "HS512"],
                options={"verify_exp": not self._ignore_expiration},
            )
        except jwt.ExpiredSignatureError:
            self._reject(conn, "expired", known)
            return
        except jwt.PyJWTError:
            self._reject(conn, "signature", known)
            return
        name = claims.get("instanceName")
        # Upstream builds its key from whatever the claim holds; a missing one gives "undefined".
        instance = name if isinstance(name, str) else "undefined"
        for rule in self._reject_rules:
            if rule[0] in (None, instance) and rule[1] in (None, event) and rule[2] != 0:
                if rule[2] > 0:
                    rule[2] -= 1
                self._reject(conn, "fault", (instance, event))
                return
        self._reject_rules = [r for r in self._reject_rules if r[2] != 0]
        # ws.handleUpgrade's own validation (a compliant client never fails it).
        key = headers.get("sec-websocket-key", "")
        try:
            key_ok = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            key_ok = False
        if (
            method != "GET"
            or headers.get("upgrade", "").lower() != "websocket"
            or not key_ok
            or headers.get("sec-websocket-version") != "13"
        ):
            self._bad_requests += 1
            conn._http_reply("400 Bad Request", b"", "text/plain")
            return
        conn.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + _accept_key(key).encode() + b"\r\n\r\n"
        )
        conn.state = ConnState.OPEN
        token_id = claims.get("tokenId")
        conn.token_id = token_id if isinstance(token_id, str) else None
        slot = self._slot(instance, event)
        slot.holder = conn  # the newest connection wins; the old one is not told
        slot.connections += 1
        conn.slot = slot
        log.debug("connection %d took slot %s/%s", conn.id, instance, event)
        if early:
            conn.buf += early
            conn._frames_received()

    # ------------------------------------------------------------------ slots and sending

    def _event_rate(self, event: str) -> float:
        if event in self._rates:
            return self._rates[event]
        return self._default_rate if event in _SENT else 0.0

    def _slot_rate(self, slot: _Slot) -> float:
        if slot.rate_override is not None:
            return slot.rate_override
        return self._event_rate(slot.event)

    def _factory(self, instance: str, event: str, size: int | None) -> Callable[[int], bytes]:
        if size is not None:
            return payloads.sized_factory(event, size)
        seed = self._seed

        def build(seq: int) -> bytes:
            return payloads.build(event, seq, seed, instance)

        return build

    def _slot(self, instance: str, event: str) -> _Slot:
        slot = self._slots.get((instance, event))
        if slot is None:
            if event not in _ALLOWED:
                raise ValueError(f"unknown event {event!r}")
            size = self._frame_size
            if size is not None:
                size = max(size, payloads.min_size(event))  # e.g. qrcode.updated needs ~320
            slot = _Slot(instance, event, self._factory(instance, event, size))
            if self._record:
                slot.frames = []
            self._slots[(instance, event)] = slot
            self._restart_generator(slot)
        return slot

    def _restart_generator(self, slot: _Slot) -> None:
        if slot.generator is not None:
            slot.generator.cancel()
            slot.generator = None
        if self._slot_rate(slot) > 0:
            slot.generator = asyncio.get_running_loop().create_task(self._generate(slot))

    async def _generate(self, slot: _Slot) -> None:
        """Emit frames at the slot's rate, whether or not anyone holds the slot.

        The schedule is absolute (frame n is due at t0 + n/rate), and each wake-up emits every
        frame that is due in one batch, so high rates stay accurate without a sleep per frame.
        If writing falls more than a second behind (a slow reader holds us in flow control),
        the missed frames are skipped and counted in ``lag_skipped`` instead of bursting later.
        """
        rate = self._slot_rate(slot)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        while True:
            now = loop.time()
            due = int((now - t0) * rate) - sent
            if due > rate + 1:
                skipped = due - int(rate)
                slot.lag_skipped += skipped
                t0 += skipped / rate
                due -= skipped
            if due > 0:
                await self._emit(slot, due)
                sent += due
            delay = t0 + (sent + 1) / rate - loop.time()
            await asyncio.sleep(max(delay, 0.001))

    async def _emit(self, slot: _Slot, count: int, size: int | None = None) -> int:
        """Assign the next ``count`` seqs and write them to the slot holder; return delivered.

        Frames go in writes of about ``_BATCH_BYTES``; after each write the task waits for flow
        control, so at most one batch plus the high-water mark is ever buffered. The holder is
        looked up per batch: a new connection taking the slot mid-way gets the rest.
        """
        make = slot.factory if size is None else self._factory(slot.instance, slot.event, size)
        delivered = 0
        async with slot.lock:
            remaining = count
            while remaining > 0:
                conn = slot.holder
                if conn is None or not conn.writable:
                    slot.seq += remaining
                    slot.dropped += remaining
                    break
                parts: list[bytes] = []
                bodies: list[bytes] | None = [] if slot.frames is not None else None
                lengths: list[int] = []
                nbytes = 0
                seq = slot.seq
                n = 0
                while n < remaining and nbytes < _BATCH_BYTES:
                    seq += 1
                    body = make(seq)
                    head = _header(len(body))
                    parts.append(head)
                    parts.append(body)
                    if bodies is not None:
                        bodies.append(body)
                    lengths.append(len(head) + len(body))
                    nbytes += lengths[-1]
                    n += 1
                conn.write(b"".join(parts))
                record_at = len(slot.frames) if slot.frames is not None else -1
                conn.batches.append((conn.written, slot, lengths, record_at))
                while conn.batches[0][0] < conn.written - _TRACK_BYTES:
                    conn.batches.popleft()
                # Counters are updated before the next await, so cancellation cannot skew them.
                slot.seq = seq
                slot.delivered += n
                conn.delivered += n
                delivered += n
                if bodies is not None and slot.frames is not None:
                    slot.frames.extend(bodies)
                remaining -= n
                if conn.write_paused:
                    await conn.drain()
                else:
                    await asyncio.sleep(0)  # let pings, stats and other slots run
        return delivered

    async def _write_injected(
        self, slot: _Slot, kind: str, frame: bytes, *, stall: bool = False
    ) -> bool:
        """Write one non-counted frame to the holder; ``stall`` leaves the holder stalled."""
        async with slot.lock:
            conn = slot.holder
            if conn is None or not conn.writable:
                return False
            conn.write(frame)
            # Set inside the lock: no _emit may write after a deliberately truncated frame.
            conn.stalled = stall
            slot.injected[kind] = slot.injected.get(kind, 0) + 1
            await conn.drain()
            return True

    # ------------------------------------------------------------------ selection helpers

    def _match_slots(self, instance: str | None, event: str | None) -> list[_Slot]:
        return [
            s
            for s in self._slots.values()
            if (instance is None or s.instance == instance) and (event is None or s.event == event)
        ]

    def _match_conns(self, instance: str | None, event: str | None) -> list[_Conn]:
        """Every live WebSocket on a matching slot: holders and displaced connections alike."""
        slots = set(map(id, self._match_slots(instance, event)))
        return [
            c
            for c in self._conns.values()
            if c.slot is not None and id(c.slot) in slots and c.state is ConnState.OPEN
        ]

    def _target_slot(self, instance: str | None, event: str | None) -> list[_Slot]:
        if instance is not None and event is not None:
            return [self._slot(instance, event)]
        return self._match_slots(instance, event)

    # ------------------------------------------------------------------ public: traffic

    def send(
        self,
        instance: str,
        event: str,
        count: int,
        *,
        size: int | None = None,
        timeout: float | None = 60.0,
    ) -> int:
        """Generate exactly ``count`` frames for the slot; return how many were delivered.

        Blocks until every frame has been written to the holder's transport or dropped (no
        open holder: counted in ``dropped``). Frames carry consecutive seqs following any
        earlier traffic on the slot. ``size`` forces ``payloads.sized`` frames of that size.
        Raises ``TimeoutError`` if the holder does not read fast enough to finish in time.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        return self._run(self._a_send(instance, event, count, size), timeout)["delivered"]

    async def _a_send(
        self, instance: str, event: str, count: int, size: int | None = None
    ) -> dict[str, int]:
        slot = self._slot(instance, event)
        before = slot.dropped
        delivered = await self._emit(slot, count, size)
        return {
            "delivered": delivered,
            "dropped": slot.dropped - before,
            "last_seq": slot.seq,
        }

    def send_raw(
        self, instance: str, event: str, payload: bytes, opcode: int = 1, *, timeout: float = 30.0
    ) -> bool:
        """Write one arbitrary frame (any opcode) to the slot holder; True if it was written.

        Counted under ``injected["raw"]``, never in ``delivered``, and not recorded.
        """
        return self._run(self._a_send_raw(instance, event, payload, opcode), timeout)

    async def _a_send_raw(self, instance: str, event: str, payload: bytes, opcode: int = 1) -> bool:
        slot = self._slot(instance, event)
        return await self._write_injected(slot, "raw", encode_frame(payload, opcode))

    def set_rate(self, event: str | None, rate: float, instance: str | None = None) -> None:
        """Change the generation rate (frames/s) at runtime.

        ``event=None`` changes ``default_rate``; ``instance`` limits the change to one slot
        (created if needed). A rate of 0 stops generation.
        """
        self._run(self._a_set_rate(event, rate, instance))

    async def _a_set_rate(
        self, event: str | None, rate: float, instance: str | None = None
    ) -> dict[str, Any]:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        if event is not None and event not in _ALLOWED:
            raise ValueError(f"unknown event {event!r}")
        if instance is not None and event is not None:
            slot = self._slot(instance, event)
            slot.rate_override = rate
            self._restart_generator(slot)
            return {"slots": 1}
        if event is None:
            self._default_rate = rate
        else:
            self._rates[event] = rate
        targets = self._match_slots(instance, event)
        for slot in targets:
            self._restart_generator(slot)
        return {"slots": len(targets)}

    def wait_for_holder(
        self, instance: str, event: str, connections: int = 1, timeout: float = 5.0
    ) -> int:
        """Block until the slot has seen ``connections`` upgrades and its holder is open.

        Returns the holder's connection id; raises ``TimeoutError``.
        """
        return self._run(self._a_wait_for_holder(instance, event, connections, timeout))

    async def _a_wait_for_holder(
        self, instance: str, event: str, connections: int, timeout: float
    ) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            slot = self._slots.get((instance, event))
            holder = slot.holder if slot is not None and slot.connections >= connections else None
            if holder is not None and holder.state is ConnState.OPEN:
                return holder.id
            if loop.time() > deadline:
                raise TimeoutError(f"no open holder for {instance}/{event}")
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ public: instances (REST)

    def create_instance(
        self, name: str, expires_in: float | None = None, status: str = "ONLINE"
    ) -> dict[str, Any]:
        """Add an instance to the listing with a fresh token; returns its listing row.

        Its slots for events with a rate start generating traffic at once (dropped until
        someone subscribes), like a new busy instance. Nothing is announced on the WebSocket.
        """
        return self._run(self._a_create_instance(name, expires_in, status))

    async def _a_create_instance(
        self, name: str, expires_in: float | None = None, status: str = "ONLINE"
    ) -> dict[str, Any]:
        row = self._rest.table.create(name, expires_in, status)
        for event in payloads.ALLOWED_EVENTS:
            slot = self._slots.get((name, event))
            if slot is not None and slot.rate_override == 0.0:
                slot.rate_override = None  # a re-created instance: traffic again
                self._restart_generator(slot)
            elif slot is None and self._event_rate(event) > 0:
                self._slot(name, event)
        log.info("instance %s created", name)
        return row

    def delete_instance(self, name: str) -> None:
        """Remove an instance from the listing; its traffic stops.

        Like upstream, its token still passes the WebSocket check and open connections stay
        open (and silent).
        """
        self._run(self._a_delete_instance(name))

    async def _a_delete_instance(self, name: str) -> dict[str, Any]:
        self._rest.table.delete(name)
        for slot in self._match_slots(name, None):
            slot.rate_override = 0.0
            self._restart_generator(slot)
        log.info("instance %s deleted", name)
        return {"deleted": name}

    def rotate_token(self, name: str, expires_in: float | None = None) -> str:
        """Give the instance a new token (what PUT /instance/refreshToken does); return it.

        The old token keeps passing the WebSocket check (upstream checks only signature and
        expiry); open connections are not touched.
        """
        return str(self._run(self._a_rotate_token(name, expires_in))["token"])

    async def _a_rotate_token(self, name: str, expires_in: float | None = None) -> dict[str, Any]:
        auth = self._rest.table.rotate(name, expires_in)
        log.info("instance %s: token rotated", name)
        return dict(auth)

    def instance_token(self, name: str) -> str:
        """The instance's current token, as the listing shows it."""
        return str(self._run(self._a_instance_token(name))["token"])

    async def _a_instance_token(self, name: str) -> dict[str, Any]:
        return {"token": self._rest.table.token(name)}

    def set_instance_status(self, name: str, status: str) -> None:
        """Set the listing's connectionStatus (ONLINE or OFFLINE) of an instance."""
        self._run(self._a_set_instance_status(name, status))

    async def _a_set_instance_status(self, name: str, status: str) -> dict[str, Any]:
        self._rest.table.set_status(name, status)
        return {"status": status}

    def api_fault(
        self, mode: str, count: int = 1, status: int = 503, seconds: float = 60.0
    ) -> None:
        """Make the next ``count`` listing requests (-1: until :meth:`api_heal`) fail.

        Modes (instances.API_FAULTS): ``status`` (HTTP ``status``), ``garbage`` (not JSON),
        ``object`` (JSON but not an array), ``empty`` (``[]``), ``reset`` (cut without an
        answer), ``hang`` (answer only after ``seconds``). The key is checked first: a wrong
        key is answered 401/403 whatever the faults.
        """
        self._run(self._a_api_fault(mode, count, status, seconds))

    async def _a_api_fault(
        self, mode: str, count: int = 1, status: int = 503, seconds: float = 60.0
    ) -> dict[str, Any]:
        rules = self._rest.fault(mode, count, status, seconds)
        log.info("fault api %s: next %d listing request(s)", mode, count)
        return {"rules": rules}

    def api_heal(self) -> int:
        """Remove every API fault; return how many rules were removed."""
        return int(self._run(self._a_api_heal())["rules"])

    async def _a_api_heal(self) -> dict[str, Any]:
        return {"rules": self._rest.heal()}

    # ------------------------------------------------------------------ public: observation

    def stats(self) -> dict[str, Any]:
        """Return a JSON-serialisable snapshot of all counters, taken atomically on the loop.

        Shape::

            {"uptime_seconds", "port", "rejected", "rejected_by_reason": {reason: n},
             "bad_requests", "connections_open", "connections_total", "delivered", "dropped",
             "injected": {kind: n}, "reject_rules": [[instance, event, remaining]],
             "slots": {instance: {event: {"delivered", "dropped", "seq", "connections",
                       "rejected", "holder", "holder_open", "rate", "lag_skipped",
                       "reset_lost", "injected": {kind: n}}}},
             "connections": {"<id>": {"instance", "event", "delivered", "open", "state",
                             "holder", "blackholed", "stalled"}}}

        Reject reasons: path, params, malformed_token, event, signature, expired, fault.
        ``seq`` is the last sequence number assigned; ``delivered + dropped == seq`` always.
        """
        return self._run(self._a_stats())

    async def _a_stats(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        slots: dict[str, dict[str, Any]] = {}
        injected: dict[str, int] = {}
        for slot in self._slots.values():
            holder = slot.holder
            slots.setdefault(slot.instance, {})[slot.event] = {
                "delivered": slot.delivered,
                "dropped": slot.dropped,
                "seq": slot.seq,
                "connections": slot.connections,
                "rejected": slot.rejected,
                "holder": holder.id if holder is not None else None,
                "holder_open": holder is not None and holder.state is ConnState.OPEN,
                "rate": self._slot_rate(slot),
                "lag_skipped": slot.lag_skipped,
                "reset_lost": slot.reset_lost,
                "client_closes": dict(slot.client_closes),
                "injected": dict(slot.injected),
            }
            for kind, n in slot.injected.items():
                injected[kind] = injected.get(kind, 0) + n
        conns = {
            str(c.id): {
                "instance": c.slot.instance,
                "event": c.slot.event,
                "delivered": c.delivered,
                "open": c.state is not ConnState.CLOSED,
                "state": c.state.value,
                "holder": c.slot.holder is c,
                "blackholed": c.blackholed,
                "stalled": c.stalled,
                "token_id": c.token_id,
                "client_close": c.client_close,
            }
            for c in self._conns.values()
            if c.slot is not None
        }
        return {
            "uptime_seconds": round(loop.time() - self._started_at, 3),
            "port": self._port,
            "rejected": self._rejected,
            "rejected_by_reason": dict(self._rejected_by_reason),
            "bad_requests": self._bad_requests,
            "connections_open": sum(1 for c in conns.values() if c["open"]),
            "connections_total": sum(s.connections for s in self._slots.values()),
            "delivered": sum(s.delivered for s in self._slots.values()),
            "dropped": sum(s.dropped for s in self._slots.values()),
            "injected": injected,
            "reject_rules": [list(r) for r in self._reject_rules],
            "slots": slots,
            "connections": conns,
            "api": {
                "instances": self._rest.table.names(),
                "listings": self._rest.listings,
                "requests": dict(self._rest.requests),
            },
        }

    def summary(self) -> dict[str, int]:
        """Totals only, cheap at 10,000 slots (``GET /stats/summary``): ``connections_total``,
        ``rejected``, ``bad_requests``, ``delivered``, ``dropped``, ``slots`` and
        ``holders_open`` (slots whose newest connection is open)."""
        return self._run(self._a_summary())

    async def _a_summary(self) -> dict[str, int]:
        return self._summary()

    def _summary(self) -> dict[str, int]:
        slots = self._slots.values()
        return {
            "connections_total": sum(s.connections for s in slots),
            "rejected": self._rejected,
            "bad_requests": self._bad_requests,
            "delivered": sum(s.delivered for s in slots),
            "dropped": sum(s.dropped for s in slots),
            "slots": len(self._slots),
            "holders_open": sum(
                1 for s in slots if s.holder is not None and s.holder.state is ConnState.OPEN
            ),
        }

    def send_many(
        self, batch: list[tuple[str, str, int]], *, timeout: float | None = 60.0
    ) -> list[tuple[int, int]]:
        """:meth:`send` for many slots in one call: ``(instance, event, count)`` each; returns
        ``(delivered, last_seq)`` per item. For load generators: one cross-thread call per tick
        instead of one per slot."""
        return self._run(self._a_send_many(batch), timeout)

    async def _a_send_many(self, batch: list[tuple[str, str, int]]) -> list[tuple[int, int]]:
        out = []
        for instance, event, count in batch:
            slot = self._slot(instance, event)
            conn = slot.holder
            if slot.lock.locked() or conn is None or not conn.writable or conn.write_paused:
                delivered = await self._emit(slot, count)  # the general path, with its waits
                out.append((delivered, slot.seq))
                continue
            # The same bookkeeping as _emit, without a yield per slot: a load generator
            # spreading frames over thousands of slots would spend its time in loop turns.
            bodies = [slot.factory(slot.seq + 1 + n) for n in range(count)]
            frames = [_header(len(body)) + body for body in bodies]
            conn.write(b"".join(frames))
            record_at = len(slot.frames) if slot.frames is not None else -1
            conn.batches.append((conn.written, slot, [len(f) for f in frames], record_at))
            while conn.batches[0][0] < conn.written - _TRACK_BYTES:
                conn.batches.popleft()
            slot.seq += count
            slot.delivered += count
            conn.delivered += count
            if slot.frames is not None:
                slot.frames.extend(bodies)
            out.append((count, slot.seq))
        await asyncio.sleep(0)  # let pings, stats and other slots run
        return out

    def delivered_frames(self, instance: str, event: str) -> list[bytes]:
        """Payloads delivered on the slot, in order (requires ``record=True``)."""
        if not self._record:
            raise RuntimeError("delivered_frames() needs Simulator(record=True)")
        return self._run(self._a_frames(instance, event))

    async def _a_frames(self, instance: str, event: str) -> list[bytes]:
        slot = self._slots.get((instance, event))
        if slot is None or slot.frames is None:
            return []
        if not slot.lost_indices:
            return list(slot.frames)
        return [f for i, f in enumerate(slot.frames) if i not in slot.lost_indices]

    # ------------------------------------------------------------------ public: faults

    def drop(self, instance: str | None = None, event: str | None = None) -> int:
        """Flush, then close TCP with FIN and no close frame (the client sees 1006).

        Applies to every open WebSocket on the matching slots (``None`` = all); returns how
        many. Every frame counted as delivered reaches the client before the FIN.
        """
        return int(self._run(self._a_drop(instance, event))["connections"])

    async def _a_drop(
        self, instance: str | None = None, event: str | None = None
    ) -> dict[str, int]:
        conns = self._match_conns(instance, event)
        loop = asyncio.get_running_loop()
        for conn in conns:
            conn.state = ConnState.CLOSING
            assert conn.transport is not None
            # write_eof() sends FIN once the buffer is flushed; reading goes on, so the client's
            # late pings do not turn our close into an RST that could destroy unread frames.
            # TLS has no half-close: close_notify and FIN once the buffer is flushed instead.
            if conn.transport.can_write_eof():
                conn.transport.write_eof()
            else:
                conn.transport.close()
            conn.eof_sent = True
            conn.linger = loop.call_later(_DROP_LINGER, conn.close_tcp)
        if conns:
            log.info("fault drop: %d connection(s)", len(conns))
        return {"connections": len(conns)}

    def close(
        self,
        instance: str | None = None,
        event: str | None = None,
        code: int = 1000,
        reason: str = "",
        timeout: float = 1.0,
    ) -> int:
        """Send a close frame (``code``, ``reason``), wait up to ``timeout`` for the echo, close.

        Upstream never does this; it is here to test the client's close-code handling.
        """
        return int(self._run(self._a_close(instance, event, code, reason, timeout))["connections"])

    async def _a_close(
        self,
        instance: str | None = None,
        event: str | None = None,
        code: int = 1000,
        reason: str = "",
        timeout: float = 1.0,
    ) -> dict[str, int]:
        conns = self._match_conns(instance, event)
        loop = asyncio.get_running_loop()
        for conn in conns:
            await self._wait_frame_boundary(conn)
            conn.send_close(code, reason)
            conn.linger = loop.call_later(timeout, conn.close_tcp)
        if conns:
            log.info("fault close %d: %d connection(s)", code, len(conns))
        return {"connections": len(conns)}

    async def _wait_frame_boundary(self, conn: _Conn) -> None:
        for _ in range(1000):  # bounded: an oversized frame may still be streaming
            if not conn.mid_frame:
                return
            await asyncio.sleep(0.01)

    def reset(
        self, instance: str | None = None, event: str | None = None, flush_timeout: float = 2.0
    ) -> int:
        """Flush, then abort with RST (``SO_LINGER`` 0).

        New frames stop at once. The reset waits up to ``flush_timeout`` until both asyncio's
        buffer and the kernel send queue are empty: everything written has then been
        acknowledged by the client's kernel, which keeps it readable after the RST (Linux).
        If the client does not read in time, the RST destroys what is still queued; those
        frames are moved from ``delivered`` to ``dropped`` (and ``reset_lost``) and removed
        from ``delivered_frames``, computed from the unacknowledged byte count, so the
        counters stay exact. Frames cut in half count as lost.
        """
        return int(self._run(self._a_reset(instance, event, flush_timeout))["connections"])

    async def _a_reset(
        self, instance: str | None = None, event: str | None = None, flush_timeout: float = 2.0
    ) -> dict[str, int]:
        conns = self._match_conns(instance, event)
        for conn in conns:
            conn.state = ConnState.CLOSING
        unflushed = await asyncio.gather(*(self._flush(c, flush_timeout) for c in conns))
        for conn, pending in zip(conns, unflushed, strict=True):
            assert conn.transport is not None
            if pending:
                self._uncount_unsent(conn, pending)
            sock = conn.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.abort_tcp()
        if conns:
            log.info("fault reset: %d connection(s)", len(conns))
        return {"connections": len(conns), "unflushed_bytes": sum(unflushed)}

    def _uncount_unsent(self, conn: _Conn, pending: int) -> None:
        """Move frames in the last ``pending`` bytes of the stream from delivered to dropped."""
        cutoff = conn.written - pending
        for batch_end, slot, lengths, record_at in reversed(conn.batches):
            if batch_end <= cutoff:
                break
            end = batch_end
            for i in range(len(lengths) - 1, -1, -1):
                if end <= cutoff:
                    break
                end -= lengths[i]
                slot.delivered -= 1
                slot.dropped += 1
                slot.reset_lost += 1
                conn.delivered -= 1
                if record_at >= 0:
                    slot.lost_indices.add(record_at + i)

    async def _flush(self, conn: _Conn, timeout: float) -> int:
        """Wait until nothing is left unacknowledged; return the bytes still pending."""
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending = conn.transport.get_write_buffer_size()
            if sock is not None:
                with contextlib.suppress(OSError):
                    raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, struct.pack("i", 0))
                    pending += struct.unpack("i", raw)[0]
            if pending == 0 or conn.state is ConnState.CLOSED or loop.time() > deadline:
                return pending if conn.state is not ConnState.CLOSED else 0
            await asyncio.sleep(0.002)

    def blackhole(self, instance: str | None = None, event: str | None = None) -> int:
        """Go silent on the matching connections until :meth:`heal`: TCP stays open.

        Nothing is sent (frames for the slot are dropped and counted as ``dropped``) and
        nothing is read, so pings go unanswered. New connections are not affected.
        """
        return int(self._run(self._a_blackhole(instance, event))["connections"])

    async def _a_blackhole(
        self, instance: str | None = None, event: str | None = None
    ) -> dict[str, int]:
        conns = self._match_conns(instance, event)
        for conn in conns:
            conn.blackholed = True
            assert conn.transport is not None
            conn.transport.pause_reading()
        if conns:
            log.info("fault blackhole: %d connection(s)", len(conns))
        return {"connections": len(conns)}

    def heal(self, instance: str | None = None, event: str | None = None) -> int:
        """Undo :meth:`blackhole` and :meth:`reject` for the scope; return connections healed.

        Pings that queued up while blackholed are answered now (late).
        """
        return int(self._run(self._a_heal(instance, event))["connections"])

    async def _a_heal(
        self, instance: str | None = None, event: str | None = None
    ) -> dict[str, int]:
        healed = 0
        for conn in self._match_conns(instance, event):
            if conn.blackholed:
                conn.blackholed = False
                assert conn.transport is not None
                conn.transport.resume_reading()
                healed += 1
        self._reject_rules = [
            r
            for r in self._reject_rules
            if not ((instance is None or r[0] == instance) and (event is None or r[1] == event))
        ]
        if healed:
            log.info("fault heal: %d connection(s)", healed)
        return {"connections": healed}

    def reject(self, count: int = 1, instance: str | None = None, event: str | None = None) -> None:
        """Answer the next ``count`` otherwise-valid upgrades in scope with the bare 401.

        ``count=-1`` rejects until :meth:`heal`. Invalid attempts do not use up the count.
        """
        self._run(self._a_reject(count, instance, event))

    async def _a_reject(
        self, count: int = 1, instance: str | None = None, event: str | None = None
    ) -> dict[str, int]:
        if count == 0 or count < -1:
            raise ValueError("count must be positive or -1")
        self._reject_rules.append([instance, event, count])
        log.info("fault reject: next %d upgrade(s)", count)
        return {"rules": len(self._reject_rules)}

    def stall_mid_frame(
        self,
        instance: str | None = None,
        event: str | None = None,
        length: int = 1 << 20,
        sent: int = 16,
    ) -> int:
        """Write a frame header announcing ``length`` bytes and ``sent`` of them, then stall.

        The connection stays open but sends nothing more (no frames, no pongs); frames for the
        slot are dropped. Only :meth:`drop`, :meth:`reset` or :meth:`stop` end it. Returns the
        number of connections stalled.
        """
        return int(self._run(self._a_stall(instance, event, length, sent))["frames"])

    async def _a_stall(
        self,
        instance: str | None = None,
        event: str | None = None,
        length: int = 1 << 20,
        sent: int = 16,
    ) -> dict[str, int]:
        if not 0 <= sent < length < 1 << 63:
            raise ValueError("need 0 <= sent < length < 2**63")
        body = b'{"keyId":"3EB0' + b"0" * max(0, sent - 14)
        frame = _header(length) + body[:sent]
        done = 0
        for slot in self._target_slot(instance, event):
            done += await self._write_injected(slot, "stall_mid_frame", frame, stall=True)
        return {"frames": done}

    def protocol_error(self, instance: str, event: str, kind: str = "rsv1", before: int = 3) -> int:
        """Write ``before`` counted frames and then a frame breaking RFC 6455, in one write.

        ``kind``: ``rsv1`` (a text frame with RSV1 set, no extension negotiated),
        ``long_close`` (a close frame with a 130-byte payload: its reason is over 123 bytes),
        ``huge_length`` (a header announcing 2**62 bytes, followed by three more valid-looking
        frames that are part of "its payload", neither counted nor recorded). A client must keep
        the ``before`` frames and fail the connection. Returns the frames delivered (0 when the
        slot has no open holder).
        """
        return int(self._run(self._a_protocol_error(instance, event, kind, before))["delivered"])

    async def _a_protocol_error(
        self, instance: str, event: str, kind: str = "rsv1", before: int = 3
    ) -> dict[str, int]:
        if kind == "rsv1":
            bad = bytes([0xC1, 2]) + b"{}"
        elif kind == "long_close":
            bad = bytes([0x88, 126]) + (130).to_bytes(2, "big") + b"\x03\xe8" + b"r" * 128
        elif kind == "huge_length":
            tail = b"".join(encode_frame(b'{"swallowed":%d}' % n) for n in range(3))
            bad = bytes([0x81, 127]) + (1 << 62).to_bytes(8, "big") + tail
        else:
            raise ValueError(f"unknown protocol error {kind!r}")
        slot = self._slot(instance, event)
        async with slot.lock:
            conn = slot.holder
            if conn is None or not conn.writable:
                return {"delivered": 0}
            bodies = [slot.factory(slot.seq + 1 + n) for n in range(before)]
            conn.write(b"".join(encode_frame(body) for body in bodies) + bad)
            slot.seq += before
            slot.delivered += before
            conn.delivered += before
            if slot.frames is not None:
                slot.frames.extend(bodies)
            slot.injected[f"protocol_{kind}"] = slot.injected.get(f"protocol_{kind}", 0) + 1
            conn.stalled = True  # nothing more on a connection the client must fail
            await conn.drain()
        return {"delivered": before}

    def _inject(self, kind: str, instance: str | None, event: str | None, count: int = 1) -> int:
        return int(self._run(self._a_inject(kind, instance, event, count))["frames"])

    async def _a_inject(
        self, kind: str, instance: str | None, event: str | None, count: int = 1, **params: int
    ) -> dict[str, int]:
        payload, opcode = _bad_frame(kind, **params)
        frame = encode_frame(payload, opcode)
        done = 0
        for slot in self._target_slot(instance, event):
            for _ in range(count):
                done += await self._write_injected(slot, kind, frame)
        return {"frames": done}

    def invalid_json(
        self, instance: str | None = None, event: str | None = None, count: int = 1
    ) -> int:
        """Send ``count`` text frames holding truncated JSON (valid UTF-8) to each holder."""
        return self._inject("invalid_json", instance, event, count)

    def binary(self, instance: str | None = None, event: str | None = None, count: int = 1) -> int:
        """Send ``count`` binary frames (opcode 2) carrying otherwise valid JSON."""
        return self._inject("binary", instance, event, count)

    def invalid_utf8(
        self, instance: str | None = None, event: str | None = None, count: int = 1
    ) -> int:
        """Send ``count`` text frames whose payload is not valid UTF-8."""
        return self._inject("invalid_utf8", instance, event, count)

    def deep_json(
        self, instance: str | None = None, event: str | None = None, depth: int = 100_000
    ) -> int:
        """Send one text frame of valid JSON nested ``depth`` levels deep."""
        return int(self._run(self._a_inject("deep_json", instance, event, depth=depth))["frames"])

    def huge_int(
        self, instance: str | None = None, event: str | None = None, digits: int = 100_000
    ) -> int:
        """Send one text frame of valid JSON holding an integer with ``digits`` digits."""
        result = self._run(self._a_inject("huge_int", instance, event, digits=digits))
        return int(result["frames"])

    def oversized(
        self,
        instance: str | None = None,
        event: str | None = None,
        size: int = 64 * 1024 * 1024,
        timeout: float | None = 120.0,
    ) -> int:
        """Stream one valid-JSON text frame of exactly ``size`` bytes to each holder.

        The payload is written in 64 KiB chunks under flow control, so the simulator never
        holds more than a chunk plus the write buffer. Returns frames completed.
        """
        return int(self._run(self._a_oversized(instance, event, size), timeout)["frames"])

    async def _a_oversized(
        self, instance: str | None = None, event: str | None = None, size: int = 64 * 1024 * 1024
    ) -> dict[str, int]:
        head = b'{"keyId":"3EB0OVERSIZED","messageType":"conversation","content":{"text":"'
        tail = b'"}}'
        if size < len(head) + len(tail):
            raise ValueError(f"size must be >= {len(head) + len(tail)}")
        chunk = b"x" * 65536
        done = 0
        for slot in self._target_slot(instance, event):
            async with slot.lock:
                conn = slot.holder
                if conn is None or not conn.writable:
                    continue
                conn.mid_frame = True
                try:
                    conn.write(_header(size) + head)
                    left = size - len(head) - len(tail)
                    while left > 0 and not conn.eof_sent and conn.state is not ConnState.CLOSED:
                        piece = chunk if left >= len(chunk) else chunk[:left]
                        conn.write(piece)
                        left -= len(piece)
                        await conn.drain()
                    if conn.eof_sent or conn.state is ConnState.CLOSED:
                        continue
                    conn.write(tail)
                finally:
                    conn.mid_frame = False
                slot.injected["oversized"] = slot.injected.get("oversized", 0) + 1
                done += 1
                await conn.drain()
        return {"frames": done}

    # ------------------------------------------------------------------ HTTP endpoints

    async def _http(
        self, conn: _Conn, method: str, target: str, body: bytes, headers: Mapping[str, str]
    ) -> None:
        path = urllib.parse.urlsplit(target).path
        if self._rest.handles(path):
            reply = self._rest.handle(method, target, headers, body)
            if reply.reset:
                conn.abort_tcp()
                return
            if reply.delay:
                await asyncio.sleep(reply.delay)  # a hanging API; cancelled by stop()
            conn._http_reply(reply.status, reply.body)
            return
        try:
            if method == "GET" and path == "/stats":
                conn._http_reply("200 OK", orjson.dumps(await self._a_stats()))
                return
            if method == "GET" and path == "/stats/summary":
                conn._http_reply("200 OK", orjson.dumps(self._summary()))
                return
            name = path.removeprefix("/control/")
            if method == "POST" and path.startswith("/control/") and name in CONTROLS:
                params = orjson.loads(body) if body.strip() else {}
                if not isinstance(params, dict):
                    raise TypeError("body must be a JSON object")
                result = await CONTROLS[name](self, **params)
                conn._http_reply("200 OK", orjson.dumps({"ok": True, **result}))
                return
            conn._http_reply("404 Not Found", orjson.dumps({"ok": False, "error": "not found"}))
        except (TypeError, ValueError, KeyError, orjson.JSONDecodeError) as exc:
            conn._http_reply("400 Bad Request", orjson.dumps({"ok": False, "error": str(exc)}))


def _bad_frame(kind: str, depth: int = 100_000, digits: int = 100_000) -> tuple[bytes, int]:
    """Payload and opcode for an injected bad frame."""
    if kind == "invalid_json":
        return b'{"keyId":"3EB0BADJSON","content":{"text":"cut here', 1
    if kind == "binary":
        return b'{"keyId":"3EB0BINARY","messageType":"conversation","content":{"text":"hi"}}', 2
    if kind == "invalid_utf8":
        return b'{"keyId":"3EB0BADUTF8","content":{"text":"\xc3\x28\xff\xfe"}}', 1
    if kind == "deep_json":
        if depth < 1:
            raise ValueError("depth must be >= 1")
        return b"[" * depth + b"]" * depth, 1
    if kind == "huge_int":
        if digits < 1:
            raise ValueError("digits must be >= 1")
        return b'{"messageTimestamp":' + b"9" * digits + b"}", 1
    raise ValueError(f"unknown injection {kind!r}")


def _control_table() -> dict[str, Callable[..., Awaitable[dict[str, Any]]]]:
    def inject(kind: str) -> Callable[..., Awaitable[dict[str, Any]]]:
        async def run(
            sim: Simulator,
            instance: str | None = None,
            event: str | None = None,
            count: int = 1,
            **params: int,
        ) -> dict[str, Any]:
            return await sim._a_inject(kind, instance, event, count, **params)

        return run

    async def send_raw(
        sim: Simulator,
        instance: str,
        event: str,
        payload: str | None = None,
        payload_b64: str | None = None,
        opcode: int = 1,
    ) -> dict[str, Any]:
        data = (
            base64.b64decode(payload_b64) if payload_b64 is not None else (payload or "").encode()
        )
        return {"written": await sim._a_send_raw(instance, event, data, opcode)}

    return {
        "drop": Simulator._a_drop,
        "close": Simulator._a_close,
        "reset": Simulator._a_reset,
        "blackhole": Simulator._a_blackhole,
        "heal": Simulator._a_heal,
        "reject": Simulator._a_reject,
        "stall_mid_frame": Simulator._a_stall,
        "invalid_json": inject("invalid_json"),
        "binary": inject("binary"),
        "invalid_utf8": inject("invalid_utf8"),
        "deep_json": inject("deep_json"),
        "huge_int": inject("huge_int"),
        "oversized": Simulator._a_oversized,
        "set_rate": Simulator._a_set_rate,
        "send": Simulator._a_send,
        "send_raw": send_raw,
        "create_instance": Simulator._a_create_instance,
        "delete_instance": Simulator._a_delete_instance,
        "rotate_token": Simulator._a_rotate_token,
        "set_instance_status": Simulator._a_set_instance_status,
        "api_fault": Simulator._a_api_fault,
        "api_heal": Simulator._a_api_heal,
    }


#: ``POST /control/<name>`` handlers; the JSON body supplies the keyword arguments.
CONTROLS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = _control_table()

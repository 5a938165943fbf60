"""The client side of the WebSocket opening handshake (RFC 6455 4.1), without the socket.

`ClientUpgrade` builds the upgrade request and is fed the bytes the server answers with, in
whatever chunks they arrive; h11 parses the HTTP. It answers once: accepted, with the bytes
that came after the 101's headers (the first WebSocket frames: the server may send an event
in the same segment), or rejected with the HTTP status. A response that is not HTTP, a 101
without the WebSocket headers or with a wrong Sec-WebSocket-Accept raises ConnectFailed.

Why not websocket-client's handshake: it reads the response one byte per `recv` call, so as
not to read past the headers. That is two system calls and an interpreter-lock hand-off per
byte; with 32 handshake threads (a start of 10,000 subscriptions, a reconnect storm, the
silence watchdog's re-subscribes) the threads convoy on the lock: measured 5.8 ms of CPU per
handshake against 0.40-0.58 ms when the response is read in chunks. Reading in chunks needs what
came after the headers handed on, which websocket-client cannot do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass

import h11

from forwarder.config import redact_url
from forwarder.errors import ConnectFailed

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
MAX_RESPONSE_HEAD = 64 * 1024  # bytes of status line and headers we read before giving up
CLOSED_DURING_UPGRADE = "the server closed the connection during the upgrade"


def accept_value(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept the server must answer `key` with."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())  # noqa: S324 (the RFC's hash)


@dataclass(frozen=True, slots=True)
class Accepted:
    """101 with valid WebSocket headers; `early`: bytes after the headers (frames)."""

    early: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """The server answered with a final HTTP status other than 101."""

    status: int


class ClientUpgrade:
    """One upgrade request and its response. Not thread-safe (one handshake's).

    `host` is the Host header's value (with the port when it is not the default), `target`
    the request target (path and query; the query holds the token, so it is never put into
    an error message)."""

    def __init__(self, host: str, target: str, key: bytes | None = None) -> None:
        self._key = key or base64.b64encode(os.urandom(16))
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        headers = [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", self._key.decode("ascii")),
            ("Sec-WebSocket-Version", "13"),
        ]
        request = h11.Request(method="GET", target=target, headers=headers)
        self.request = self._conn.send(request) + self._conn.send(h11.EndOfMessage())

    def receive(self, data: bytes) -> Accepted | Rejected | None:
        """Bytes from the server (b"": it closed the connection). None: more are needed."""
        try:
            self._conn.receive_data(data)
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    if not data:
                        raise ConnectFailed(CLOSED_DURING_UPGRADE)
                    return None
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        self._check(event.headers)
                        return Accepted(bytes(self._conn.trailing_data[0]))
                    continue  # 100 Continue and the like: the real answer follows
                if isinstance(event, h11.Response):
                    return Rejected(event.status_code)
                if isinstance(event, h11.ConnectionClosed):
                    raise ConnectFailed(CLOSED_DURING_UPGRADE)
                raise ConnectFailed(f"unexpected HTTP event {type(event).__name__}")
        except h11.RemoteProtocolError as exc:
            if not data:  # h11's view of an EOF in the middle of the answer
                raise ConnectFailed(CLOSED_DURING_UPGRADE) from None
            # h11 quotes what it could not parse: a server that echoes our request would put
            # the token into the message.
            text = redact_url(str(exc))[:200]
            raise ConnectFailed(f"the server's answer to the upgrade is not HTTP: {text}") from None

    def _check(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        found: dict[bytes, bytes] = {}
        for name, value in headers:  # h11 lower-cases the names
            found[name] = found[name] + b"," + value if name in found else value
        tokens = {t.strip().lower() for t in found.get(b"connection", b"").split(b",")}
        if found.get(b"upgrade", b"").strip().lower() != b"websocket" or b"upgrade" not in tokens:
            raise ConnectFailed("the server answered 101 without upgrading to WebSocket")
        if not hmac.compare_digest(
            found.get(b"sec-websocket-accept", b"").strip(), accept_value(self._key)
        ):
            raise ConnectFailed("the server answered 101 with a wrong Sec-WebSocket-Accept")

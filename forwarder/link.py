"""One open WebSocket connection's protocol state, without the socket (sans-I/O).

A `Link` is fed the bytes its I/O loop read and the loop's clock, and answers with messages,
the client frames to write (ping, close) and, when a deadline passed, why the connection is
over. The subscription rules (subscription.py) own their links; the loop owns the sockets.

Deadlines, all measured on the monotonic clock:
* keepalive: the upstream never pings, so after `ping_interval` without a byte we ping, and a
  ping unanswered (no byte at all) within `ping_timeout` ends the connection;
* read timeout: a frame that started arriving must be complete within `read_timeout`, however
  steadily its bytes trickle in: a header announcing 2^62 bytes followed by valid frames would
  otherwise swallow those frames as "payload" forever (issue 9). Progress is a completed frame;
* close echo: after we sent a close frame, the server's echo (or EOF) must come within
  CLOSE_ECHO_TIMEOUT; frames still in flight meanwhile are read as usual.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from forwarder.actions import Action, Listen, Release, Send
from forwarder.config import SourceConfig
from forwarder.frames import FrameParser, Opcode, client_frame, close_payload, plausible_length
from forwarder.spool import Entry

CLOSE_ECHO_TIMEOUT = 2.0  # seconds a closing connection is read for the server's close frame
# Keepalive pings are due on a grid of ping_interval / PING_GRID_STEPS (1 s at the default
# 20 s), so the pings of thousands of idle connections leave in a few loop turns and their
# pongs come back together: one turn and one epoll_wait for hundreds of them instead of one
# each. A ping leaves at most one grid step late, which no keepalive notices.
PING_GRID_STEPS = 20

_PING = int(Opcode.PING)
_PONG = int(Opcode.PONG)
_CLOSE = int(Opcode.CLOSE)
# Entry(...) goes through the NamedTuple's Python-level __new__: three times slower, per frame.
_new_entry = tuple.__new__


MASK_POOL_BYTES = 4096  # masks drawn from the OS at a time: 1,024 of them


class _MaskPool(threading.local):
    """Per thread (each I/O loop has its own): bytes from os.urandom not handed out yet."""

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0


_masks = _MaskPool()


def random_mask() -> bytes:
    """A fresh, unpredictable masking key per client frame (RFC 6455 5.3). Thread-safe.

    Drawn from os.urandom 4 KiB at a time: at 10,000 idle subscriptions the keepalive writes
    500 pings a second, and a getrandom system call for each was a tenth of their cost."""
    pool = _masks
    pos = pool.pos
    if pos + 4 > len(pool.data):
        pool.data = os.urandom(MASK_POOL_BYTES)
        pos = 0
    pool.pos = pos + 4
    return pool.data[pos : pos + 4]


@dataclass(frozen=True, slots=True)
class LinkEnd:
    """Why a connection is over: close code label, explanation, unix time the feed was lost."""

    label: str
    why: str
    lost_at: float


class Link:
    """The state of one connection. Not thread-safe: owned by one I/O loop thread.

    Times: `opened`, `last_rx`, `last_data`, `ping_sent`, `frame_started`, `closing_since`
    are monotonic seconds; `opened_wall` and `last_rx_wall` are unix time.
    """

    __slots__ = (
        "_frames_seen",
        "_mask",
        "_source",
        "closing_since",
        "data_frames",
        "frame_started",
        "id",
        "last_data",
        "last_rx",
        "last_rx_wall",
        "listening",
        "opened",
        "opened_wall",
        "parser",
        "ping_sent",
        "retry_at",
    )

    def __init__(
        self,
        link_id: int,
        source: SourceConfig,
        now: float,
        wall: float,
        mask: Callable[[], bytes] = random_mask,
    ) -> None:
        self.id = link_id
        self._source = source
        self._mask = mask
        self.parser = FrameParser(source.max_frame_bytes, plausible_length(source.read_timeout))
        self.opened = now
        self.opened_wall = wall  # when the handshake completed: when we took the feed
        self.last_rx = now  # the last byte received (or the handshake)
        self.last_rx_wall = wall
        self.last_data = now  # the last data frame (or the handshake)
        self.ping_sent: float | None = None
        self.frame_started: float | None = None  # a frame in progress started arriving then
        self._frames_seen = 0
        self.closing_since: float | None = None  # we sent a close frame then
        self.listening = False  # the loop reads this socket (a parked replacement does not)
        self.data_frames = 0
        self.retry_at = -math.inf  # no re-subscribe before this, after a failed one

    @property
    def closing(self) -> bool:
        return self.closing_since is not None

    def receive(
        self,
        data: bytes,
        now: float,
        wall: float,
        index: int,
        out: list[Entry],
        actions: list[Action],
    ) -> tuple[int, int, bytes | None]:
        """Bytes from the socket. Their data frames are appended to `out` (as entries of
        spool route `index`), pongs for their pings to `actions`; returns (data frames,
        payload bytes, the payload of a close frame or None). Messages after a close frame are
        ignored; after a protocol violation `parser.error` is set. The hot path: per read."""
        self.last_rx = now
        self.last_rx_wall = wall
        self.ping_sent = None  # any byte shows the peer is alive
        parser = self.parser
        messages = parser.feed(data)
        if parser.mid_message:
            if self.frame_started is None or parser.frames != self._frames_seen:
                self.frame_started = now  # a new frame began in this chunk
        else:
            self.frame_started = None
        self._frames_seen = parser.frames
        count = len(out)
        nbytes = 0
        for opcode, payload in messages:
            if opcode >= _CLOSE:  # a plain int: an Enum member lookup per frame costs
                assert isinstance(payload, bytes)
                if opcode == _CLOSE:
                    return len(out) - count, nbytes, payload
                if opcode == _PING:
                    actions.append(Send(self.id, self.pong(payload)))
                continue
            out.append(_new_entry(Entry, (index, opcode, payload, wall)))
            nbytes += len(payload) if isinstance(payload, bytes) else len(payload.head)
        return len(out) - count, nbytes, None

    def deadline(self) -> float:
        """When `expired` or `ping` next has something to say (monotonic; inf: never)."""
        source = self._source
        if self.closing_since is not None:
            due = self.closing_since + CLOSE_ECHO_TIMEOUT
        elif self.ping_sent is None:
            grid = source.ping_interval / PING_GRID_STEPS
            due = math.ceil((self.last_rx + source.ping_interval) / grid) * grid
        else:
            due = self.ping_sent + source.ping_timeout
        if self.frame_started is not None:
            due = min(due, self.frame_started + source.read_timeout)
        return due

    def expired(self, now: float, wall: float) -> LinkEnd | None:
        """The reason this connection is dead by now, if it is."""
        source = self._source
        if self.frame_started is not None and now - self.frame_started >= source.read_timeout:
            return LinkEnd(
                "1006",
                f"stalled for {source.read_timeout:g}s in the middle of a frame",
                self.last_rx_wall,
            )
        if self.closing_since is not None:
            if now - self.closing_since >= CLOSE_ECHO_TIMEOUT:
                return LinkEnd("1006", "no close echo from the server", wall)
            return None
        if self.ping_sent is not None and now - self.ping_sent >= source.ping_timeout:
            return LinkEnd("1006", f"no pong within {source.ping_timeout:g}s", self.last_rx_wall)
        return None

    def ping(self, now: float) -> bytes | None:
        """The ping frame to write now, if the connection has been silent for ping_interval."""
        if self.closing_since is not None or self.ping_sent is not None:
            return None
        if now - self.last_rx < self._source.ping_interval:
            return None
        self.ping_sent = now
        return client_frame(_PING, b"", self._mask())

    def pong(self, payload: bytes) -> bytes:
        """The answer to a server ping (RFC 6455 5.5.3: echo its payload)."""
        return client_frame(_PONG, payload, self._mask())

    def close(self, code: int, now: float) -> bytes | None:
        """Our close frame, once; afterwards the connection only waits for the echo."""
        if self.closing_since is not None:
            return None
        self.closing_since = now
        if not (1000 <= code <= 4999) or code in (1005, 1006, 1015):
            code = 1000  # codes that must never be sent on the wire
        return client_frame(_CLOSE, close_payload(code), self._mask())


class LinkSet:
    """The open connections of one subscription (the one being read and, during a
    make-before-break, the replacement parked until it is drained), and the actions that
    read, write and release them. `emit` hands an action to the subscription's list."""

    __slots__ = ("_emit", "_mask", "_source", "links")

    def __init__(
        self, source: SourceConfig, emit: Callable[[Action], None], mask: Callable[[], bytes]
    ) -> None:
        self._source = source
        self._emit = emit
        self._mask = mask
        self.links: dict[int, Link] = {}

    def open(self, link_id: int, now: float, wall: float) -> Link:
        link = Link(link_id, self._source, now, wall, self._mask)
        self.links[link_id] = link
        return link

    def listen(self, link: Link) -> None:
        link.listening = True
        self._emit(Listen(link.id))

    def close(self, link: Link, code: int, now: float) -> None:
        """Send our close frame (once); the link then waits for the echo."""
        frame = link.close(code, now)
        if frame is not None:
            self._emit(Send(link.id, frame))

    def release(self, link: Link) -> None:
        if self.links.pop(link.id, None) is not None:
            link.listening = False
            self._emit(Release(link.id))

    def deadline(self) -> float:
        due = math.inf
        for link in self.links.values():
            if link.listening:
                due = min(due, link.deadline())
        return due

    def due(self, now: float, wall: float) -> list[tuple[Link, LinkEnd]]:
        """Ping the links silent for ping_interval; return the ones whose deadline passed
        (for the caller to end: nothing is removed here)."""
        ended: list[tuple[Link, LinkEnd]] = []
        for link in self.links.values():
            if not link.listening:
                continue
            end = link.expired(now, wall)
            if end is not None:
                ended.append((link, end))
                continue
            ping = link.ping(now)
            if ping is not None:
                self._emit(Send(link.id, ping))
        return ended

"""Sans-I/O WebSocket framing (RFC 6455 section 5): server frames in, client frames out.

The handshake pool (handshake.py, upgrade.py) opens the connection; after it, an I/O loop
reads the socket in large chunks and feeds them here. Doing the framing ourselves buys what
websocket-client lacks
(docs/library-notes.md section 1.4): a size limit enforced *before* a payload is buffered (an
oversized frame is skipped while its head and a SHA-256 are kept), knowledge of whether we are
in the middle of a frame (to detect a peer that stalls mid-frame), and speed (one `recv` of
256 KiB yields hundreds of frames instead of three syscalls per frame).

A protocol violation never costs the frames before it: `feed` returns every message completed
ahead of the violation in the same chunk and records the violation in `error`; the caller
stores those messages, then fails the connection (close code 1002).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from forwarder.errors import SubscriberError

OVERSIZED_HEAD_BYTES = 1024
# No frame length above this is ever plausible (2^63 - 1 is RFC 6455's own bound); callers
# pass a tighter one: what can arrive within their read timeout (see `plausible_length`).
MAX_FRAME_LENGTH = (1 << 63) - 1
# Faster than any link this daemon reads from (10 GbE is ~1.2 GB/s): a frame header claiming
# more than read_timeout seconds of this can only be garbage, or an attack on the skip logic.
MAX_BYTES_PER_SECOND = 4 << 30


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class ProtocolViolation(SubscriberError):
    """The server broke RFC 6455 framing; the connection must be failed (close code 1002)."""


@dataclass(frozen=True, slots=True)
class Oversized:
    """A data message larger than the limit: what is kept of it instead of its payload."""

    opcode: int
    size: int
    head: bytes  # the first OVERSIZED_HEAD_BYTES of the payload
    sha256: str  # of the whole payload


# What `feed` yields: (opcode, payload) for complete messages and control frames, or
# (opcode, Oversized) for a data message that exceeded the limit.
Message = tuple[int, "bytes | Oversized"]


def plausible_length(read_timeout: float) -> int:
    """The largest frame length that could finish arriving within `read_timeout` seconds."""
    return min(MAX_FRAME_LENGTH, max(1 << 20, int(read_timeout * MAX_BYTES_PER_SECOND)))


class FrameParser:
    """Turns a byte stream into messages. Not thread-safe: owned by one I/O loop thread.

    `max_message_bytes`: data messages above it are skipped (an `Oversized` comes out instead).
    `max_frame_length`: a frame header claiming more is a protocol violation at once.
    """

    def __init__(self, max_message_bytes: int, max_frame_length: int = MAX_FRAME_LENGTH) -> None:
        self._max = max_message_bytes
        self._max_length = max_frame_length
        self.error: ProtocolViolation | None = None  # set once; nothing is parsed after it
        self.frames = 0  # frames completed so far (skipped ones included): progress
        self._chunks: list[bytes] = []  # received bytes not yet parsed
        self._buffered = 0
        self._need = 2  # bytes required before parsing can make progress
        # A fragmented data message being assembled.
        self._frag_opcode: int | None = None
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
        # An oversized message being skipped: bytes of the current frame still to discard.
        self._skip_msg: _Skipped | None = None
        self._skip_left = 0
        self._skip_final = False
        self._pending_out: list[Message] = []  # output produced while starting a skip

    @property
    def mid_message(self) -> bool:
        """True while part of a frame or of a fragmented message has been received."""
        return bool(self._buffered or self._frag_opcode is not None or self._skip_msg)

    def feed(self, data: bytes) -> list[Message]:
        """Parse `data`; return every message it completes, in order.

        Never raises. On a framing error the messages completed before it are still returned
        and `error` is set; the connection is then unusable and later calls return nothing.
        The hot path (one call per read): kept to this method and `_parse_frames`.
        """
        out: list[Message] = []
        if self.error is not None:
            return out
        try:
            while True:
                if self._skip_left:
                    data = self._skip(data, out)
                    if not data:
                        return out
                chunks = self._chunks
                if chunks:
                    chunks.append(data)
                    self._buffered += len(data)
                    if self._buffered < self._need:
                        return out
                    work = b"".join(chunks)
                    chunks.clear()
                else:
                    if len(data) < self._need:
                        chunks.append(data)
                        self._buffered = len(data)
                        return out
                    work = data
                before = len(out)
                pos = self._parse_frames(work, out)
                # Every complete frame but a continuation yields one message, and
                # continuations are rare: count messages here, continuation frames where
                # they end.
                self.frames += len(out) - before
                rest = work[pos:] if pos < len(work) else b""
                if self._skip_left and rest:
                    rest = self._skip(rest, out)
                    if rest:  # the skipped frame ended inside this chunk: parse what follows
                        self._buffered = 0
                        data = rest
                        continue
                if rest:
                    chunks.append(rest)
                self._buffered = len(rest)
                return out
        except ProtocolViolation as exc:
            self.error = exc
            self._chunks.clear()
            self._buffered = 0
        return out

    def _parse_frames(self, buf: bytes, out: list[Message]) -> int:
        pos = 0
        n = len(buf)
        append = out.append
        limit = self._max
        while True:
            # Fast path for what the upstream sends: a complete, unfragmented, unmasked
            # text (or binary) frame with a 7- or 16-bit length, and the pongs answering our
            # pings. Everything else, including every error, takes the general path below.
            if n - pos >= 2 and self._frag_opcode is None and self._skip_msg is None:
                b0 = buf[pos]
                if b0 in (0x81, 0x82, 0x8A):  # FIN + text, binary, pong
                    b1 = buf[pos + 1]
                    if b1 < 126:  # a pong is never longer (control frames: <= 125 bytes)
                        end = pos + 2 + b1
                        if end <= n and b1 <= limit:
                            append((b0 & 0x0F, buf[pos + 2 : end]))
                            pos = end
                            continue
                    elif b1 == 126 and b0 != 0x8A and n - pos >= 4:
                        length = (buf[pos + 2] << 8) | buf[pos + 3]
                        end = pos + 4 + length
                        if end <= n and length <= limit:
                            append((b0 & 0x0F, buf[pos + 4 : end]))
                            pos = end
                            continue
            if n - pos < 2:
                self._need = 2
                return pos
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                header = 4
                if n - pos < 4:
                    self._need = 4
                    return pos
                length = (buf[pos + 2] << 8) | buf[pos + 3]
            elif length == 127:
                header = 10
                if n - pos < 10:
                    self._need = 10
                    return pos
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise ProtocolViolation("frame length has the most significant bit set")
                if length > self._max_length:
                    raise ProtocolViolation(
                        f"a frame header claims {length} bytes, more than can arrive within "
                        "read_timeout"
                    )
            if b0 & 0x70:
                raise ProtocolViolation("reserved bits set without a negotiated extension")
            if b1 & 0x80:
                raise ProtocolViolation("the server sent a masked frame")
            opcode = b0 & 0x0F
            fin = bool(b0 & 0x80)
            if opcode >= 0x8:
                if not fin or length > 125:
                    raise ProtocolViolation("fragmented or oversized control frame")
                if opcode not in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
                    raise ProtocolViolation(f"unknown control opcode {opcode:#x}")
                if opcode == Opcode.CLOSE and length == 1:
                    raise ProtocolViolation("a close frame with a one-byte payload")
            elif opcode not in (Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY):
                raise ProtocolViolation(f"unknown data opcode {opcode:#x}")
            start = pos + header
            end = start + length
            if opcode < 0x8 and self._too_big(opcode, length):
                if n < start:
                    self._need = header
                    return pos
                self._pending_out = out
                self._begin_skip(opcode, length, fin)
                if not self._skip_left:
                    pos = start
                    continue
                return start  # the payload bytes present are consumed by _skip
            if end > n:
                self._need = end - pos
                return pos
            payload = buf[start:end]
            pos = end
            if opcode >= 0x8:
                out.append((opcode, payload))
            elif opcode == Opcode.CONTINUATION:
                if self._frag_opcode is None:
                    raise ProtocolViolation("continuation frame without a message to continue")
                self._frag_parts.append(payload)
                self._frag_size += length
                if not fin:
                    self.frames += 1  # a frame that yields no message (yet)
                if fin:
                    out.append((self._frag_opcode, b"".join(self._frag_parts)))
                    self._frag_opcode = None
                    self._frag_parts = []
                    self._frag_size = 0
            else:
                if self._frag_opcode is not None:
                    raise ProtocolViolation("new data message before the previous one finished")
                if fin:
                    out.append((opcode, payload))
                else:
                    self.frames += 1
                    self._frag_opcode = opcode
                    self._frag_parts = [payload]
                    self._frag_size = length

    def _too_big(self, opcode: int, length: int) -> bool:
        if opcode == Opcode.CONTINUATION:
            if self._skip_msg is not None:
                return True  # the rest of a message already being skipped
            if self._frag_opcode is None:
                return False  # _parse reports the protocol error
            return self._frag_size + length > self._max
        return length > self._max

    def _begin_skip(self, opcode: int, length: int, fin: bool) -> None:
        if self._skip_msg is None:
            if opcode == Opcode.CONTINUATION:
                # The message grew past the limit: what was assembled so far is its head.
                assert self._frag_opcode is not None
                state = _Skipped(self._frag_opcode)
                for part in self._frag_parts:
                    state.add(part)
                self._frag_opcode = None
                self._frag_parts = []
                self._frag_size = 0
            else:
                if self._frag_opcode is not None:
                    raise ProtocolViolation("new data message before the previous one finished")
                state = _Skipped(opcode)
            self._skip_msg = state
        elif opcode != Opcode.CONTINUATION:
            raise ProtocolViolation("new data message before the previous one finished")
        self._skip_left = length
        self._skip_final = fin
        self._need = 2
        if length == 0:
            self._skip(b"", self._pending_out)

    def _skip(self, data: bytes, out: list[Message]) -> bytes:
        """Discard payload bytes of an oversized frame; return the bytes after it."""
        take = min(self._skip_left, len(data))
        state = self._skip_msg
        assert state is not None
        state.add(data[:take])
        self._skip_left -= take
        if self._skip_left == 0:
            if self._skip_final:
                out.append((state.opcode, state.result()))
                self._skip_msg = None
            self.frames += 1  # a skipped frame is progress too (no message counted it)
        return data[take:]


class _Skipped:
    """What is kept of an oversized message while its bytes are discarded."""

    __slots__ = ("digest", "head", "opcode", "size")

    def __init__(self, opcode: int) -> None:
        self.opcode = opcode
        self.size = 0
        self.head = b""
        self.digest = hashlib.sha256()

    def add(self, part: bytes) -> None:
        self.size += len(part)
        self.digest.update(part)
        if len(self.head) < OVERSIZED_HEAD_BYTES:
            self.head += part[: OVERSIZED_HEAD_BYTES - len(self.head)]

    def result(self) -> Oversized:
        return Oversized(self.opcode, self.size, self.head, self.digest.hexdigest())


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client-to-server frame: clients must mask (RFC 6455 5.3) with a fresh key."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    if not n:
        return head + mask
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """A close frame's payload: the status code, then at most 123 bytes of reason."""
    return code.to_bytes(2, "big") + reason[:123]


def close_code(payload: bytes) -> int:
    """The status code of a close frame's payload; 1005 when it carries none (RFC 6455 7.1.5)."""
    if len(payload) >= 2:
        return int.from_bytes(payload[:2], "big")
    return 1005

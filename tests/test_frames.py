"""The frame parser: RFC 6455 framing, size limit, fragmentation, and arbitrary input."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder.frames import FrameParser, Opcode, Oversized, ProtocolViolation, close_code


def frame(payload: bytes, opcode: int = Opcode.TEXT, fin: bool = True) -> bytes:
    head = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return bytes([head, n]) + payload
    if n < 65536:
        return bytes([head, 126]) + struct.pack("!H", n) + payload
    return bytes([head, 127]) + struct.pack("!Q", n) + payload


def test_many_frames_in_one_chunk_come_out_in_order() -> None:
    """Small, 16-bit and 64-bit length frames in one chunk are all returned, in order."""
    payloads = [b"{}", b"[" + b"1," * 100 + b"1]", b'{"a":"' + b"x" * 70000 + b'"}']
    parser = FrameParser(1 << 20)
    out = parser.feed(b"".join(frame(p) for p in payloads))
    assert out == [(Opcode.TEXT, p) for p in payloads]
    assert not parser.mid_message


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8), st.data())
def test_any_split_of_the_stream_gives_the_same_messages(
    payloads: list[bytes], data: st.DataObject
) -> None:
    """However the byte stream is cut into chunks, the same messages come out."""
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = FrameParser(1 << 20)
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += parser.feed(stream[start:cut])
        start = cut
    assert out == [(Opcode.TEXT, p) for p in payloads]


def test_fragmented_message_is_reassembled_around_a_ping() -> None:
    """Continuation frames are joined; a control frame in between is delivered on its own."""
    data = (
        frame(b'{"a":', fin=False)
        + frame(b"hi", Opcode.PING)
        + frame(b"1", Opcode.CONTINUATION, fin=False)
        + frame(b"}", Opcode.CONTINUATION)
    )
    out = FrameParser(1024).feed(data)
    assert out == [(Opcode.PING, b"hi"), (Opcode.TEXT, b'{"a":1}')]


def test_oversized_frame_is_skipped_with_head_and_hash_and_the_next_frame_survives() -> None:
    """A frame over the limit is replaced by its size, head and SHA-256; parsing goes on."""
    big = b"x" * 5000
    parser = FrameParser(1000)
    stream = frame(big) + frame(b"[1]")
    out = []
    for i in range(0, len(stream), 333):  # arrives in pieces: never buffered whole
        out += parser.feed(stream[i : i + 333])
    assert len(out) == 2
    opcode, skipped = out[0]
    assert opcode == Opcode.TEXT
    assert skipped == Oversized(Opcode.TEXT, 5000, big[:1024], hashlib.sha256(big).hexdigest())
    assert out[1] == (Opcode.TEXT, b"[1]")


def test_fragmented_message_growing_past_the_limit_is_skipped_whole() -> None:
    """The limit applies to the whole message, not to each fragment."""
    parts = [b"a" * 600, b"b" * 600, b"c" * 600]
    data = (
        frame(parts[0], fin=False)
        + frame(parts[1], Opcode.CONTINUATION, fin=False)
        + frame(parts[2], Opcode.CONTINUATION)
        + frame(b"{}")
    )
    out = FrameParser(1000).feed(data)
    whole = b"".join(parts)
    digest = hashlib.sha256(whole).hexdigest()
    assert out == [
        (Opcode.TEXT, Oversized(Opcode.TEXT, 1800, whole[:1024], digest)),
        (Opcode.TEXT, b"{}"),
    ]


def test_mid_message_is_true_only_inside_a_frame() -> None:
    """mid_message tells a stalled peer (inside a frame) from an idle one."""
    parser = FrameParser(1024)
    data = frame(b"[1,2,3]")
    parser.feed(data[:3])
    assert parser.mid_message
    parser.feed(data[3:])
    assert not parser.mid_message


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x81 | 0x40, 0]),  # RSV1 without an extension
        bytes([0x81, 0x80 | 1, 0, 0, 0, 0, 0x41]),  # a masked server frame
        bytes([0x09, 0]),  # a fragmented ping
        bytes([0x80, 0]),  # a continuation with nothing to continue
        bytes([0x83, 0]),  # reserved data opcode
    ],
)
def test_protocol_violations_raise(data: bytes) -> None:
    """Framing errors raise ProtocolViolation, which fails the connection with 1002."""
    with pytest.raises(ProtocolViolation):
        FrameParser(1024).feed(data)


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_protocol_violation(data: bytes) -> None:
    """Garbage from the network yields messages or ProtocolViolation, never another error."""
    parser = FrameParser(512)
    try:
        for i in range(0, len(data), 97):
            parser.feed(data[i : i + 97])
    except ProtocolViolation:
        pass


def test_close_code() -> None:
    """A close frame's code is read; an empty close frame means 1005."""
    assert close_code(struct.pack("!H", 4001) + b"bye") == 4001
    assert close_code(b"") == 1005

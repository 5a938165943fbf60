"""The frame parser and encoder: RFC 6455 framing, size and length limits, fragmentation,
frames kept ahead of a violation, client frames, and arbitrary input."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder.frames import (
    MAX_BYTES_PER_SECOND,
    FrameParser,
    Opcode,
    Oversized,
    client_frame,
    close_code,
    close_payload,
    plausible_length,
)


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


VIOLATIONS = [
    bytes([0x81 | 0x40, 0]),  # RSV1 without an extension
    bytes([0x81, 0x80 | 1, 0, 0, 0, 0, 0x41]),  # a masked server frame
    bytes([0x09, 0]),  # a fragmented ping
    bytes([0x80, 0]),  # a continuation with nothing to continue
    bytes([0x83, 0]),  # reserved data opcode
    bytes([0x88, 1, 3]),  # a close frame with a one-byte payload
    bytes([0x88, 126, 0, 130]) + b"\x03\xe8" + b"r" * 128,  # a close reason over 123 bytes
    bytes([0x81, 127]) + (1 << 63).to_bytes(8, "big"),  # the length's top bit set
]


@pytest.mark.parametrize("data", VIOLATIONS)
def test_protocol_violations_are_reported_and_end_parsing(data: bytes) -> None:
    """Framing errors set `error` (the connection is then failed with 1002); nothing after."""
    parser = FrameParser(1024)
    assert parser.feed(data) == []
    assert parser.error is not None
    assert parser.feed(frame(b"{}")) == []


@pytest.mark.parametrize("data", VIOLATIONS)
def test_messages_before_a_violation_in_the_same_chunk_are_returned(data: bytes) -> None:
    """Valid frames ahead of a violation come out; the violation is reported after them."""
    parser = FrameParser(1024)
    out = parser.feed(frame(b"[1]") + frame(b"ping", Opcode.PING) + frame(b"[2]") + data)
    assert out == [(Opcode.TEXT, b"[1]"), (Opcode.PING, b"ping"), (Opcode.TEXT, b"[2]")]
    assert parser.error is not None


def test_a_frame_length_that_cannot_arrive_in_time_is_a_violation() -> None:
    """A header claiming 2^62 bytes is refused at once, not skipped; a plausible one is skipped."""
    limit = plausible_length(30.0)
    assert limit == 30 * MAX_BYTES_PER_SECOND
    parser = FrameParser(1024, limit)
    head = bytes([0x81, 127]) + (1 << 62).to_bytes(8, "big")
    assert parser.feed(frame(b"[0]") + head + frame(b"[1]")) == [(Opcode.TEXT, b"[0]")]
    assert parser.error is not None
    assert "4611686018427387904" in str(parser.error)
    parser = FrameParser(1024, limit)
    assert parser.feed(bytes([0x81, 127]) + (limit).to_bytes(8, "big") + b"x" * 10) == []
    assert parser.error is None
    assert parser.mid_message  # skipping it: the read timeout bounds how long that may take


def test_frames_counts_every_completed_frame_including_fragments_and_skipped_ones() -> None:
    """`frames` grows with each finished frame: the progress the read timeout looks for."""
    parser = FrameParser(1000)
    parser.feed(frame(b"a", fin=False))
    assert parser.frames == 1
    parser.feed(frame(b"b", Opcode.CONTINUATION))
    assert parser.frames == 2
    big = frame(b"x" * 5000)
    parser.feed(big[:100])
    assert parser.frames == 2
    parser.feed(big[100:])
    assert parser.frames >= 3
    before = parser.frames
    parser.feed(frame(b"{}") + frame(b"[]"))
    assert parser.frames == before + 2


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Garbage from the network yields messages, or sets `error`; feed never raises."""
    parser = FrameParser(512)
    for i in range(0, len(data), 97):
        parser.feed(data[i : i + 97])


@given(st.binary(max_size=70_000), st.sampled_from([Opcode.PING, Opcode.CLOSE, Opcode.TEXT]))
def test_client_frames_are_masked_and_decode_to_their_payload(payload: bytes, opcode: int) -> None:
    """client_frame: FIN, the mask bit, the right length form, payload XOR the key."""
    mask = b"\x01\x02\x03\x04"
    data = client_frame(opcode, payload, mask)
    assert data[0] == 0x80 | opcode
    assert data[1] & 0x80
    n = data[1] & 0x7F
    pos = 2
    if n == 126:
        n, pos = int.from_bytes(data[2:4], "big"), 4
    elif n == 127:
        n, pos = int.from_bytes(data[2:10], "big"), 10
    assert n == len(payload)
    assert data[pos : pos + 4] == mask
    body = data[pos + 4 :]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload


def test_close_code() -> None:
    """A close frame's code is read; an empty close frame means 1005; reasons are capped."""
    assert close_code(struct.pack("!H", 4001) + b"bye") == 4001
    assert close_code(b"") == 1005
    assert close_payload(1000, b"r" * 200) == struct.pack("!H", 1000) + b"r" * 123

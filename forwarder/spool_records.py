"""What the spool stores: entries, routes, and the on-disk record format.

One record per entry (little-endian):
    magic b"FWS1" | u32 length of what follows the crc | u32 crc32(body + offset)
    | body: f64 received_at | u16 opcode | u16 key length | key | payload
    | u64 offset
where key is "source\\0event\\0stream\\0dead-letter stream", so a record can be written even
after its subscription left the configuration. Oversized frames store a JSON description
(size, sha256, head in base64) with the OVERSIZED flag set in the opcode. A torn or corrupt
record is found by its crc; `decode` then tells the caller where the next record may start.

Pure functions over bytes: no file, no lock. The per-frame cost of `encode` and `pack` is the
append hot path (two C-level crc32 calls and a join per frame).
"""

from __future__ import annotations

import base64
import collections
import operator
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from forwarder.frames import Oversized

# An internal opcode (outside RFC 6455's 4 bits) for a gap record: an interval in which a
# subscription was not receiving. Its payload is a JSON object of the record's fields; the
# writer appends it to the gap stream, ordered with the frames of its subscription.
GAP = 0x100
OVERSIZED_FLAG = 0x8000

MAGIC = b"FWS1"
HEAD = struct.Struct("<4sII")  # magic, length (body + offset), crc
BODY = struct.Struct("<dHH")  # received_at, opcode, key length
OFFSET = struct.Struct("<Q")
# Bytes a record adds to its prefix and payload: the head and the offset.
RECORD_OVERHEAD = HEAD.size + OFFSET.size
_ROUTE = operator.itemgetter(0)  # an Entry's route index


class Entry(NamedTuple):
    """One received frame (or a GAP record), as the subscriber saw it."""

    subscription: int  # index into the spool's routes (the daemon's subscription list first)
    opcode: int
    payload: bytes | Oversized
    received_at: float  # unix time


Batch = list[tuple[int, Entry]]  # (offset, entry), offsets increasing


@dataclass(frozen=True)
class Route:
    """Where a subscription's entries go; stored in every record."""

    source: str
    event: str
    stream: str
    dead_letter_stream: str

    def key(self) -> bytes:
        return "\0".join((self.source, self.event, self.stream, self.dead_letter_stream)).encode()

    @classmethod
    def from_key(cls, key: bytes) -> Route:
        """The route a record names; a damaged key still gives a route (orphans stream)."""
        parts = key.decode("utf-8", "replace").split("\0")
        if len(parts) != 4:  # not ours or damaged beyond its crc: keep the frame anyway
            defaults = ["?", "?", "forwarder:orphans", "forwarder:orphans:dlq"]
            parts = parts[:4] + defaults[len(parts) :]
        return cls(*parts)


def entry_size(entry: Entry) -> int:
    """The payload bytes an entry counts for (the head only, for an oversized frame)."""
    payload = entry.payload
    return len(payload) if isinstance(payload, bytes) else len(payload.head)


# A record without its head and offset: (prefix = body header + key, payload, crc of both,
# payload size as counted by entry_size).
Body = tuple[bytes, bytes, int, int]


def encode(
    entries: Sequence[Entry], route_keys: Sequence[bytes]
) -> tuple[list[Body], dict[int, int], int]:
    """Bodies of `entries`, entries per route, and the bytes their records will take.

    The prefix (time, opcode, route key) and its crc are computed once per distinct
    (route, opcode, time) in the chunk, not once per frame.
    """
    # route -> (opcode, received_at, prefix, its crc) of the route's last entry: the frames
    # of one read share all three; with many routes (a fleet) most entries miss anyway, and
    # a miss then costs no tuple key.
    prefixes: dict[int, tuple[int, float, bytes, int]] = {}
    bodies: list[Body] = []
    append = bodies.append
    incoming = RECORD_OVERHEAD * len(entries)
    crc32 = zlib.crc32
    body_pack = BODY.pack
    for entry in entries:
        route, opcode, payload, received_at = entry
        if type(payload) is not bytes:
            assert isinstance(payload, Oversized)
            size = len(payload.head)
            payload = _oversized_json(payload)
            opcode |= OVERSIZED_FLAG
        else:
            size = len(payload)
        cached = prefixes.get(route)
        if cached is None or cached[1] != received_at or cached[0] != opcode:
            key = route_keys[route]
            prefix = body_pack(received_at, opcode, len(key)) + key
            prefix_crc = crc32(prefix)
            prefixes[route] = (opcode, received_at, prefix, prefix_crc)
        else:
            prefix, prefix_crc = cached[2], cached[3]
        append((prefix, payload, crc32(payload, prefix_crc), size))
        incoming += len(prefix) + len(payload)
    # Entries per route, counted in C.
    routes = dict(collections.Counter(map(_ROUTE, entries)))
    return bodies, routes, incoming


def pack(bodies: Sequence[Body], offsets: range | Sequence[int]) -> bytes:
    """The records of `bodies` with their offsets (one per body), ready for one write."""
    parts: list[bytes] = []
    head_pack = HEAD.pack
    offset_pack = OFFSET.pack
    crc32 = zlib.crc32
    for (prefix, payload, crc, _), offset in zip(bodies, offsets, strict=True):
        offset_bytes = offset_pack(offset)
        parts += (
            head_pack(MAGIC, len(prefix) + len(payload) + 8, crc32(offset_bytes, crc)),
            prefix,
            payload,
            offset_bytes,
        )
    return b"".join(parts)


def record_size(body: Body) -> int:
    """Bytes the record of `body` takes on disk."""
    return RECORD_OVERHEAD + len(body[0]) + len(body[1])


class Record(NamedTuple):
    """A decoded record: its offset, route key, entry fields, and where it ends."""

    offset: int
    key: bytes
    opcode: int
    payload: bytes | Oversized
    received_at: float
    size: int  # entry_size of the entry
    start: int  # position of the record in the buffer it was decoded from
    end: int  # position just after it


def record_length(data: bytes, pos: int) -> int:
    """How many bytes the record starting at `pos` claims (at least a head)."""
    if len(data) - pos < HEAD.size:
        return HEAD.size
    return int(HEAD.unpack_from(data, pos)[1]) + HEAD.size


def decode(data: bytes, pos: int) -> Record | int | None:
    """The record at `pos`; an int: corrupt bytes, skip to there; None: incomplete here."""
    if len(data) - pos < HEAD.size:
        return None
    magic, length, crc = HEAD.unpack_from(data, pos)
    end = pos + HEAD.size + length
    well_framed = magic == MAGIC and length >= BODY.size + 8
    if well_framed and end > len(data):
        return None  # incomplete here: read more (or it is being appended right now)
    if not well_framed:
        return resync(data, pos)
    record = data[pos + HEAD.size : end]
    if zlib.crc32(record) != crc:
        return resync(data, pos)
    received_at, opcode, key_len = BODY.unpack_from(record, 0)
    key = record[BODY.size : BODY.size + key_len]
    raw = record[BODY.size + key_len : -8]
    (offset,) = OFFSET.unpack_from(record, len(record) - 8)
    payload: bytes | Oversized = raw
    size = len(raw)
    if opcode & OVERSIZED_FLAG:
        opcode &= ~OVERSIZED_FLAG
        info = orjson.loads(raw)
        payload = Oversized(
            int(info["opcode"]),
            int(info["size"]),
            base64.b64decode(info["head"]),
            info["sha256"],
        )
        size = len(payload.head)
    return Record(offset, key, opcode, payload, received_at, size, pos, end)


def resync(data: bytes, pos: int) -> int:
    """Where the next record may start after corrupt bytes at `pos` (the next MAGIC)."""
    nxt = data.find(MAGIC, pos + 1)
    return nxt if nxt >= 0 else len(data)


def scan(data: bytes) -> tuple[list[Record], int]:
    """Every good record of a whole segment, and the end of the last good one.

    Corrupt records are skipped silently: the writer counts them when it reads past them.
    A record whose length runs past the end is a torn tail only if no good record follows
    (a damaged length field must not hide the records after it).
    """
    records: list[Record] = []
    pos = 0
    good_end = 0
    while True:
        record = decode(data, pos)
        if record is None:
            if pos >= len(data):
                return records, good_end
            record = resync(data, pos)
        if isinstance(record, int):
            pos = record
            continue
        records.append(record)
        pos = good_end = record.end


def _oversized_json(payload: Oversized) -> bytes:
    """What a record stores for an oversized frame: its size, hash and head."""
    return orjson.dumps(
        {
            "size": payload.size,
            "sha256": payload.sha256,
            "head": base64.b64encode(payload.head).decode(),
            "opcode": payload.opcode,
        }
    )

"""The disk spool: order, restart, torn and corrupt records, size limit, exclusivity."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.frames import Opcode, Oversized
from forwarder.spool import SEGMENT_SUFFIX, DiskSpool, Entry, Route, SpoolError, entry_size

ROUTES = [
    Route("main", "messages.upsert", "messages.upsert", "messages.upsert:dlq"),
    Route("main", "chats.upsert", "chats.upsert", "chats.upsert:dlq"),
]


def frames(sub: int, start: int, count: int) -> list[Entry]:
    return [
        Entry(sub, Opcode.TEXT, b'{"n":%d}' % i, 1000.0 + i) for i in range(start, start + count)
    ]


def put(spool: DiskSpool, entries: list[Entry]) -> None:
    assert spool.append(entries, sum(entry_size(e) for e in entries))


def drain(spool: DiskSpool, commit: bool = True) -> list[bytes]:
    """Everything pending, in order (committing it unless told not to)."""
    out: list[bytes] = []
    while True:
        batch = spool.peek(7, 0)
        if not batch:
            return out
        out += [e.payload for _, e in batch]  # type: ignore[misc]
        if not commit:
            return out
        spool.commit(batch)


def test_entries_come_back_in_order_with_increasing_offsets(tmp_path: Path) -> None:
    """Entries of two subscriptions come back in append order, offsets strictly increasing."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 5))
    put(spool, frames(1, 5, 5))
    batch = spool.peek(100, 0)
    assert [o for o, _ in batch] == list(range(1, 11))
    assert [e.subscription for _, e in batch] == [0] * 5 + [1] * 5
    assert spool.pending_by_route == [5, 5]
    spool.commit(batch)
    assert spool.pending() == (0, 0)
    spool.close()


def test_uncommitted_entries_survive_a_restart_and_committed_ones_do_not(tmp_path: Path) -> None:
    """After close and reopen, exactly the uncommitted entries are pending, same offsets."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 10))
    first = spool.peek(4, 0)
    spool.commit(first)
    writer_id = spool.writer_id
    spool.close()
    again = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    assert again.writer_id == writer_id  # same high-water mark in Redis
    batch = again.peek(100, 0)
    assert [o for o, _ in batch] == list(range(5, 11))
    assert [e.payload for _, e in batch] == [b'{"n":%d}' % i for i in range(4, 10)]
    assert again.pending_by_route == [6, 0]
    put(again, frames(0, 10, 1))
    assert again.peek(100, 0)[-1][0] == 11  # offsets continue
    again.close()


def test_backlog_beyond_the_memory_cache_is_read_back_from_disk_in_order(tmp_path: Path) -> None:
    """With a tiny cache (Redis down for long), entries are read from segment files, in order."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30, cache_bytes=50, segment_bytes=400)
    for i in range(0, 300, 10):
        put(spool, frames(i % 2, i, 10))
    assert drain(spool) == [b'{"n":%d}' % i for i in range(300)]
    assert spool.stats.disk_reads > 0
    put(spool, frames(0, 300, 3))  # caught up: the cache is used again
    reads = spool.stats.disk_reads
    assert drain(spool) == [b'{"n":%d}' % i for i in range(300, 303)]
    assert spool.stats.disk_reads == reads
    assert spool.disk_bytes() == 0  # every segment was confirmed and deleted
    assert not list(tmp_path.glob("*" + SEGMENT_SUFFIX))
    spool.close()


def test_a_torn_tail_is_cut_and_appends_continue(tmp_path: Path) -> None:
    """A record cut short by a crash is dropped at start-up; everything before it survives."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 3))
    spool.close()
    (segment,) = tmp_path.glob("*" + SEGMENT_SUFFIX)
    data = segment.read_bytes()
    record = len(data) // 3
    segment.write_bytes(data + data[:record][: record // 2])  # half a record: a torn write
    again = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(again, frames(0, 3, 1))
    assert drain(again) == [b'{"n":%d}' % i for i in range(4)]
    again.close()


def test_a_corrupt_record_is_skipped_and_counted(tmp_path: Path) -> None:
    """A flipped byte inside one record loses that record only; the rest is delivered."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 3))
    spool.close()
    (segment,) = tmp_path.glob("*" + SEGMENT_SUFFIX)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the second record's payload
    segment.write_bytes(bytes(data))
    again = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    assert drain(again) == [b'{"n":0}', b'{"n":2}']
    assert again.stats.corrupt_records >= 1
    again.close()


def test_a_full_spool_refuses_new_entries_and_keeps_the_old(tmp_path: Path) -> None:
    """At max_bytes, append returns False (the caller counts and logs); nothing is evicted."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=2000)
    accepted = 0
    for i in range(100):
        if spool.append(frames(0, i, 1), 8):
            accepted += 1
    assert 0 < accepted < 100
    assert spool.stats.rejected_full == 100 - accepted
    assert drain(spool) == [b'{"n":%d}' % i for i in range(accepted)]
    spool.close()


def test_two_processes_cannot_share_a_spool(tmp_path: Path) -> None:
    """A second spool on the same directory is refused with a clear error."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    with pytest.raises(SpoolError, match="another forwarder process is using it"):
        DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    spool.close()


def test_oversized_entries_and_removed_subscriptions_round_trip(tmp_path: Path) -> None:
    """Oversized metadata survives the disk; a removed subscription's frames keep their route."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    big = Oversized(Opcode.TEXT, 50_000_000, b"head", "cd" * 32)
    assert spool.append([Entry(1, Opcode.TEXT, big, 5.0)], 4)
    spool.close()
    again = DiskSpool(tmp_path, ROUTES[:1], max_bytes=1 << 30)  # chats.upsert removed
    ((_, entry),) = again.peek(10, 0)
    assert entry.payload == big
    assert again.routes[entry.subscription] == ROUTES[1]
    again.close()


def test_readers_wait_for_a_lagging_healthy_writer_but_never_during_an_outage(
    tmp_path: Path,
) -> None:
    """Past the backlog a reader is held until the writer commits; not while Redis is down."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30, backlog_entries=10)
    put(spool, frames(0, 0, 30))
    released = threading.Event()

    def writer() -> None:
        batch = spool.peek(30, 0)
        released.wait(0.2)
        spool.commit(batch)

    thread = threading.Thread(target=writer)
    thread.start()
    started = time.monotonic()
    spool.wait_for_writer(5.0)  # held until the commit, well before the 5 s bound
    assert 0.1 < time.monotonic() - started < 4.0
    assert spool.pending()[0] == 0
    thread.join()
    put(spool, frames(0, 30, 30))
    spool.writer_ok(False)  # Redis is failing: readers must keep reading into the spool
    started = time.monotonic()
    spool.wait_for_writer(5.0)
    assert time.monotonic() - started < 0.1
    spool.close()


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_sequence_of_appends_commits_and_restarts_keeps_exactly_the_uncommitted(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Against a model list: whatever mix of cache, disk, rotation and restarts, peek returns
    exactly the uncommitted entries in order, each once."""
    directory = tmp_path_factory.mktemp("spool")
    cache_bytes = data.draw(st.sampled_from([1, 200, 1 << 20]))

    def open_spool() -> DiskSpool:
        return DiskSpool(
            directory, ROUTES, max_bytes=1 << 30, cache_bytes=cache_bytes, segment_bytes=300
        )

    spool = open_spool()
    model: list[bytes] = []  # uncommitted payloads, in order
    counter = 0
    for _ in range(data.draw(st.integers(1, 25))):
        action = data.draw(st.sampled_from(["append", "append", "commit", "restart"]))
        if action == "append":
            count = data.draw(st.integers(1, 12))
            put(spool, frames(counter % 2, counter, count))
            model += [b'{"n":%d}' % i for i in range(counter, counter + count)]
            counter += count
        elif action == "commit":
            batch = spool.peek(data.draw(st.integers(1, 20)), 0)
            assert [e.payload for _, e in batch] == model[: len(batch)]
            take = data.draw(st.integers(0, len(batch)))
            spool.commit(batch[:take])
            del model[:take]
        else:
            spool.close()
            spool = open_spool()
        assert spool.pending()[0] == len(model)
    assert drain(spool) == model
    spool.close()

"""The disk spool: order, restart, torn and corrupt records, size limit, exclusivity, and the
disk failing under it (full, deleted, an older copy restored)."""

from __future__ import annotations

import errno
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.frames import Opcode, Oversized
from forwarder.spool import SEGMENT_SUFFIX, DiskSpool, Entry, Route, SpoolError, entry_size
from forwarder.spool_records import scan
from forwarder.spool_segments import SegmentWriteError
from tests.tmpfs import fill_up, mounted_tmpfs

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
    assert again.peek(100, 0)[-1][0] > 10  # offsets continue above every earlier one
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
    assert spool.stats.dropped["max_bytes"] == 100 - accepted
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
    exactly the uncommitted entries in order, each once, and offsets only ever grow."""
    directory = tmp_path_factory.mktemp("spool")
    cache_bytes = data.draw(st.sampled_from([1, 200, 1 << 20]))

    def open_spool() -> DiskSpool:
        return DiskSpool(
            directory, ROUTES, max_bytes=1 << 30, cache_bytes=cache_bytes, segment_bytes=300
        )

    spool = open_spool()
    model: list[bytes] = []  # uncommitted payloads, in order
    counter = 0
    seen: dict[bytes, int] = {}  # payload -> its offset, as peek showed it

    def record(batch: list[tuple[int, Entry]]) -> list[bytes]:
        payloads = [cast(bytes, e.payload) for _, e in batch]
        for (offset, _), payload in zip(batch, payloads, strict=True):
            assert seen.setdefault(payload, offset) == offset  # a frame keeps its offset
        return payloads

    for _ in range(data.draw(st.integers(1, 25))):
        action = data.draw(st.sampled_from(["append", "append", "commit", "restart"]))
        if action == "append":
            count = data.draw(st.integers(1, 12))
            put(spool, frames(counter % 2, counter, count))
            model += [b'{"n":%d}' % i for i in range(counter, counter + count)]
            counter += count
        elif action == "commit":
            batch = spool.peek(data.draw(st.integers(1, 20)), 0)
            record(batch)
            assert [e.payload for _, e in batch] == model[: len(batch)]
            take = data.draw(st.integers(0, len(batch)))
            spool.commit(batch[:take])
            del model[:take]
        else:
            spool.close()
            spool = open_spool()
        assert spool.pending()[0] == len(model)
    rest: list[bytes] = []
    while batch := spool.peek(7, 0):
        rest += record(batch)
        spool.commit(batch)
    assert rest == model
    # Frames appended later have higher offsets, whatever restarts came between.
    assert sorted(seen, key=lambda p: int(p[5:-1])) == sorted(seen, key=seen.__getitem__)
    spool.close()


# -- the disk: full, failing, deleted, restored -------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), as in the issue's reproduction."""
    with mounted_tmpfs(tmp_path / "fs") as path:
        yield path


def kib_frames(sub: int, start: int, count: int) -> list[Entry]:
    """Frames of about 1 KiB, numbered like `frames`."""
    pad = b"x" * 1000
    return [
        Entry(sub, Opcode.TEXT, b'{"n":%d,"p":"%s"}' % (i, pad), 1000.0)
        for i in range(start, start + count)
    ]


def test_a_full_disk_sends_frames_through_memory_and_names_the_filesystem(small_fs: Path) -> None:
    """ENOSPC: the chunk is kept in memory (counted, not dropped), the spool says it cannot
    write and where, and the frames still come out in order."""
    clock = FakeClock()
    spool = DiskSpool(small_fs / "spool", ROUTES, max_bytes=1 << 30, clock=clock)
    put(spool, frames(0, 0, 5))
    filler = fill_up(small_fs)
    put(spool, kib_frames(0, 5, 10))  # the disk cannot take these: memory
    assert spool.stats.memory_only == 10
    assert spool.memory_only() == 10
    assert spool.stats.dropped == {"max_bytes": 0, "write_error": 0}
    assert not writable(spool)
    problem = spool.problem()
    assert problem is not None
    assert "No space left on device" in problem
    assert f"mounted at {small_fs}" in problem
    assert "0 of 2,097,152 bytes free" in problem
    assert spool.stats.write_errors >= 1
    out = drain(spool)
    assert [json_n(p) for p in out] == list(range(15))
    assert spool.disk_bytes() == 0  # the disk is short of space: even a small segment goes
    filler.unlink()
    clock.now += 1.0  # past the pause between disk attempts
    put(spool, frames(0, 15, 1))
    assert writable(spool)
    assert spool.problem() is None
    spool.close()


def writable(spool: DiskSpool) -> bool:
    """spool.writable, read afresh (mypy would narrow the property across asserts)."""
    return spool.writable


def json_n(payload: bytes) -> int:
    return int(payload.split(b",")[0].split(b":")[1].strip(b"}"))


def test_space_is_reclaimed_as_soon_as_frames_are_confirmed(small_fs: Path) -> None:
    """Redis down fills the disk; once Redis confirms, the segments go and appends go to disk
    again; with memory used up too, only then are chunks refused, and counted as such."""
    clock = FakeClock()
    spool = DiskSpool(
        small_fs / "spool", ROUTES, max_bytes=1 << 30, cache_bytes=1 << 20, clock=clock
    )
    n = 0
    while writable(spool) and n < 5000:  # bounded: 2 MiB of 1 KiB frames
        put(spool, kib_frames(0, n, 10))
        n += 10
    assert not writable(spool)  # the disk is full: what follows goes through memory...
    refused = 0
    for _ in range(200):  # ...until the 1 MiB of memory_bytes is taken too
        if spool.append(kib_frames(0, n, 10), 10 * 1011):
            n += 10
        else:
            refused += 10
    assert spool.stats.memory_only > 0
    assert refused > 0
    assert spool.stats.dropped["write_error"] == refused
    # Redis comes back and confirms everything: the disk is reclaimed at once.
    assert [json_n(p) for p in drain(spool)] == list(range(n))
    assert spool.disk_bytes() == 0
    assert not list((small_fs / "spool").glob("*" + SEGMENT_SUFFIX))
    clock.now += 1.0
    put(spool, kib_frames(0, n, 10))  # on disk again
    assert writable(spool)
    assert spool.memory_only() == 0
    spool.close()


def test_segments_are_small_next_to_the_filesystem_so_confirmed_ones_go_early(
    small_fs: Path,
) -> None:
    """With frames still pending, confirming the older half frees about half the disk."""
    spool = DiskSpool(small_fs / "spool", ROUTES, max_bytes=1 << 30, cache_bytes=1 << 20)
    for n in range(0, 1200, 10):  # 1.2 MB of a 2 MiB disk
        put(spool, kib_frames(0, n, 10))
    before = spool.disk_bytes()
    committed = 0
    while committed < 600:
        batch = spool.peek(600 - committed, 0)
        spool.commit(batch)
        committed += len(batch)
    assert spool.disk_bytes() < before * 0.6
    spool.close()


def test_starting_on_a_full_filesystem_is_a_clear_error(small_fs: Path) -> None:
    """No traceback: a SpoolError that names the directory, the error and the filesystem."""
    fill_up(small_fs)
    with pytest.raises(SpoolError) as raised:
        DiskSpool(small_fs / "spool", ROUTES, max_bytes=1 << 30)
    message = str(raised.value)
    assert str(small_fs / "spool") in message
    assert "No space left on device" in message
    assert f"mounted at {small_fs}" in message


def test_memory_only_frames_go_back_to_disk_before_newer_ones(small_fs: Path) -> None:
    """Frames kept in memory while the disk was full are written first once it has room
    again: after a restart everything is there, in order."""
    clock = FakeClock()
    spool = DiskSpool(small_fs / "spool", ROUTES, max_bytes=1 << 30, clock=clock)
    put(spool, kib_frames(0, 0, 3))
    filler = fill_up(small_fs)
    put(spool, kib_frames(0, 3, 8))
    assert spool.memory_only() == 8
    filler.unlink()
    clock.now += 1.0
    put(spool, kib_frames(0, 11, 3))
    assert spool.memory_only() == 0
    assert writable(spool)
    spool.close()
    again = DiskSpool(small_fs / "spool", ROUTES, max_bytes=1 << 30)
    assert [json_n(p) for p in drain(again)] == list(range(14))
    again.close()


def test_frames_still_in_memory_only_at_close_are_counted_lost_not_claimed(small_fs: Path) -> None:
    """A stop while the disk is full: pending() no longer counts what is not on disk."""
    spool = DiskSpool(small_fs / "spool", ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 2))
    fill_up(small_fs)
    put(spool, kib_frames(0, 2, 4))  # more than the last page of the segment holds
    assert spool.pending()[0] == 6
    spool.close()
    assert spool.stats.lost == 4
    assert spool.pending()[0] == 2


def test_offsets_stay_above_everything_handed_out_when_an_older_copy_comes_back(
    tmp_path: Path,
) -> None:
    """What a machine crash can leave (the directory as it was a moment earlier): the next
    run's offsets are above every offset the lost tail had, so Redis never skips new frames."""
    directory = tmp_path / "spool"
    spool = DiskSpool(directory, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 5))
    snapshot = tmp_path / "snapshot"
    shutil.copytree(directory, snapshot, ignore=shutil.ignore_patterns("lock"))
    put(spool, frames(0, 5, 5))
    applied = drain(spool)  # Redis applied offsets up to the 10th
    handed_out = spool.peek(1, 0)
    assert not handed_out
    assert len(applied) == 10
    spool.close()
    shutil.rmtree(directory)
    shutil.copytree(snapshot, directory)
    again = DiskSpool(directory, ROUTES, max_bytes=1 << 30)
    put(again, frames(0, 10, 1))
    offsets = [o for o, _ in again.peek(100, 0)]
    assert offsets[:5] == [1, 2, 3, 4, 5]  # the copy's own frames (Redis skips them)
    assert offsets[5] > 10  # the new frame: above every offset of the lost tail
    again.close()


def test_a_spool_of_the_previous_version_is_taken_over(tmp_path: Path) -> None:
    """A spool with a `cursor` file and no state file (the previous version's layout): its
    cursor is honoured, its frames replayed, the file replaced by the state file."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 6))
    spool.close()
    (tmp_path / "state").unlink()
    (tmp_path / "cursor").write_text("2")  # Redis had confirmed offsets 1 and 2
    again = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    assert drain(again) == [b'{"n":%d}' % i for i in range(2, 6)]
    put(again, frames(0, 6, 1))
    assert again.peek(1, 0)[0][0] > 6
    again.close()
    assert not (tmp_path / "cursor").exists()
    assert (tmp_path / "state").exists()


def test_ensure_offsets_above_moves_the_next_offset(tmp_path: Path) -> None:
    """A reconcile with Redis' high-water mark: new offsets start above it, also after a
    restart."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    spool.ensure_offsets_above(10_000_000)
    put(spool, frames(0, 0, 1))
    assert spool.peek(1, 0)[0][0] == 10_000_001
    spool.close()
    again = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(again, frames(0, 1, 1))
    assert [o for o, _ in again.peek(5, 0)][-1] > 10_000_001
    again.close()


def test_a_deleted_directory_is_recreated_with_what_is_still_in_memory(tmp_path: Path) -> None:
    """rm -rf while running: the directory comes back with every pending frame still in
    memory (the writer's batch included); /readyz would say so; nothing is counted lost."""
    directory = tmp_path / "spool"
    spool = DiskSpool(directory, ROUTES, max_bytes=1 << 30, segment_bytes=400)
    put(spool, frames(0, 0, 20))
    held = spool.peek(5, 0)  # the writer holds these, unconfirmed
    shutil.rmtree(directory)
    spool.verify()
    assert directory.is_dir()
    problem = spool.problem()
    assert problem is not None
    assert "was deleted" in problem
    assert spool.stats.lost == 0
    assert spool.pending()[0] == 20
    assert spool.memory_only() == 0  # written back at once: a crash now loses nothing
    assert on_disk(directory) == set(range(1, 21))
    spool.commit(held)
    put(spool, frames(1, 20, 2))
    writer_id = spool.writer_id
    spool.close()
    again = DiskSpool(directory, ROUTES, max_bytes=1 << 30)
    assert again.writer_id == writer_id  # the same high-water mark in Redis still applies
    assert drain(again) == [b'{"n":%d}' % i for i in range(5, 22)]
    again.close()


def on_disk(directory: Path) -> set[int]:
    """The offsets of every good record in the directory's segment files."""
    return {r.offset for p in directory.glob("*" + SEGMENT_SUFFIX) for r in scan(p.read_bytes())[0]}


def test_a_directory_replaced_by_an_empty_one_is_taken_over(tmp_path: Path) -> None:
    """rm -rf and mkdir (a tmpfiles rule, an operator): the new directory is locked and gets
    the pending frames; a second process cannot take it meanwhile."""
    directory = tmp_path / "spool"
    spool = DiskSpool(directory, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 4))
    shutil.rmtree(directory)
    directory.mkdir()
    spool.verify()
    problem = spool.problem()
    assert problem is not None
    assert "was replaced" in problem
    assert on_disk(directory) == {1, 2, 3, 4}
    with pytest.raises(SpoolError, match="another forwarder process is using it"):
        DiskSpool(directory, ROUTES, max_bytes=1 << 30)
    spool.close()


def test_an_unreadable_segment_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """A segment the spool cannot read is a SpoolError naming the directory, no traceback."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    spool.close()
    (tmp_path / f"{1:020d}{SEGMENT_SUFFIX}").mkdir()  # not a file: reading it fails
    with pytest.raises(SpoolError, match=f"spool.dir {tmp_path}: cannot start: Is a directory"):
        DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)


def test_frames_only_on_disk_when_it_was_deleted_are_counted_lost(tmp_path: Path) -> None:
    """With the backlog beyond the memory cache, a deleted directory loses the frames that
    were only on disk: counted exactly, and never claimed after."""
    directory = tmp_path / "spool"
    spool = DiskSpool(directory, ROUTES, max_bytes=1 << 30, cache_bytes=50, segment_bytes=400)
    put(spool, frames(0, 0, 5))  # in the cache (about 40 bytes)
    put(spool, frames(1, 5, 25))  # on disk only
    shutil.rmtree(directory)
    spool.verify()
    assert spool.stats.lost == 25
    assert spool.pending()[0] == 5
    assert spool.pending_by_route == [5, 0]
    assert drain(spool, commit=False) == [b'{"n":%d}' % i for i in range(5)]
    spool.close()
    again = DiskSpool(directory, ROUTES, max_bytes=1 << 30)
    assert drain(again) == [b'{"n":%d}' % i for i in range(5)]
    again.close()


def test_a_deleted_segment_file_is_noticed_and_the_rest_kept(tmp_path: Path) -> None:
    """A cleaner deleting old files: the frames of the deleted segment that were not in
    memory are counted lost; every other frame stays, in order."""
    directory = tmp_path / "spool"
    spool = DiskSpool(directory, ROUTES, max_bytes=1 << 30, cache_bytes=50, segment_bytes=300)
    for i in range(0, 60, 5):
        put(spool, frames(0, i, 5))
    segments = sorted(directory.glob("*" + SEGMENT_SUFFIX))
    assert len(segments) >= 3
    second = segments[1]
    in_second = [r.offset for r in scan(second.read_bytes())[0]]
    second.unlink()
    spool.verify()
    assert spool.stats.lost == len(in_second)
    want = [b'{"n":%d}' % (o - 1) for o in range(1, 61) if o not in in_second]
    assert drain(spool) == want
    spool.close()


def test_a_damaged_length_field_does_not_hide_the_records_after_it(tmp_path: Path) -> None:
    """One record's length claims more than the file holds: only that record is lost."""
    spool = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    put(spool, frames(0, 0, 3))
    spool.close()
    (segment,) = tmp_path.glob("*" + SEGMENT_SUFFIX)
    data = bytearray(segment.read_bytes())
    data[4:8] = (1 << 30).to_bytes(4, "little")  # the first record's length
    segment.write_bytes(bytes(data))
    again = DiskSpool(tmp_path, ROUTES, max_bytes=1 << 30)
    assert drain(again) == [b'{"n":1}', b'{"n":2}']
    again.close()


class FailingDisk:
    """Makes the spool's segment writes fail with ENOSPC while `failing` is set."""

    def __init__(self, spool: DiskSpool) -> None:
        self.failing = False
        segments = spool._segments
        write, write_sealed = segments.write, segments.write_sealed

        def failing_write(first: int, data: bytes) -> tuple[int, int]:
            self.check()
            return write(first, data)

        def failing_write_sealed(first: int, data: bytes) -> None:
            self.check()
            write_sealed(first, data)

        segments.write = failing_write  # type: ignore[method-assign]
        segments.write_sealed = failing_write_sealed  # type: ignore[method-assign]

    def check(self) -> None:
        if self.failing:
            raise SegmentWriteError(OSError(errno.ENOSPC, "No space left on device"), False)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_mix_with_a_failing_disk_keeps_exactly_the_uncommitted_in_order(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Against a model list, with the disk failing and recovering at random: memory-only
    frames and frames on disk interleave, and peek still returns exactly the uncommitted
    ones, in order, each once, also across restarts (taken with a working disk)."""
    directory = tmp_path_factory.mktemp("spool")
    clock = FakeClock()
    cache_bytes = data.draw(st.sampled_from([1, 200, 1 << 20]))

    def open_spool() -> tuple[DiskSpool, FailingDisk]:
        spool = DiskSpool(
            directory,
            ROUTES,
            max_bytes=1 << 30,
            cache_bytes=cache_bytes,
            segment_bytes=300,
            clock=clock,
        )
        return spool, FailingDisk(spool)

    spool, disk = open_spool()
    model: list[bytes] = []
    counter = 0
    for _ in range(data.draw(st.integers(1, 30))):
        action = data.draw(st.sampled_from(["append", "append", "commit", "fail", "restart"]))
        if action == "append":
            count = data.draw(st.integers(1, 6))
            if spool.append(frames(counter % 2, counter, count), 8 * count):
                model += [b'{"n":%d}' % i for i in range(counter, counter + count)]
            counter += count
        elif action == "commit":
            batch = spool.peek(data.draw(st.integers(1, 20)), 0)
            assert [e.payload for _, e in batch] == model[: len(batch)]
            take = data.draw(st.integers(0, len(batch)))
            spool.commit(batch[:take])
            del model[:take]
        elif action == "fail":
            disk.failing = not disk.failing
            clock.now += data.draw(st.sampled_from([0.0, 1.0]))
        else:
            disk.failing = False
            spool.close()
            assert spool.stats.lost == 0
            spool, disk = open_spool()
        assert spool.pending()[0] == len(model)
    disk.failing = False
    assert drain(spool) == model
    spool.close()

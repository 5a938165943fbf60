"""The Redis writer against a real redis-server: fields, order, idempotence, dead letters."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex

from forwarder import sink
from forwarder.config import Config, RedisConfig
from forwarder.frames import Opcode, Oversized
from forwarder.redis_target import RedisTarget, make_target
from forwarder.sink import RedisWriter, error_kind
from forwarder.spool import GAP, DiskSpool, Entry, Route
from forwarder.stats import SubscriptionStats, WriterStats
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for, xrange
from tests.proxy import SlowReplyProxy


class Harness:
    """A writer over a disk spool, for the subscriptions of a config."""

    def __init__(self, config: Config, client: RedisTarget, spool_dir: Path) -> None:
        self.subs = config.subscriptions()
        routes = [Route(s.source.name, s.event, s.stream, s.dead_letter_stream) for s in self.subs]
        self.spool = DiskSpool(spool_dir, routes, max_bytes=1 << 30)
        self.stats = [SubscriptionStats(r.source, r.event, r.stream) for r in self.spool.routes]
        self.writer_stats = WriterStats()
        self.writer = RedisWriter(
            client, self.spool, self.stats, self.writer_stats, config.redis, rand=lambda: 0.0
        )

    def close(self) -> None:
        self.writer.stop(time.monotonic() + 2)
        self.writer.join(5)
        self.spool.close()

    def put(self, sub: int, payloads: list[bytes], opcode: int = Opcode.TEXT) -> None:
        entries = [Entry(sub, opcode, p, 1_700_000_000.123) for p in payloads]
        assert self.spool.append(entries, sum(len(p) for p in payloads))


@pytest.fixture
def harness(
    make_config: ConfigFactory, redis_server: RedisServer, tmp_path: Path
) -> Iterator[Harness]:
    config = make_config({"main": ["messages.upsert", "chats.upsert"]})
    client = make_target(RedisConfig(url=redis_server.url))
    h = Harness(config, client, tmp_path / "spool")
    yield h
    h.close()
    client.close()


def test_entries_have_exactly_the_four_fields_in_arrival_order(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """Each frame becomes one entry: data byte for byte, event, source, received_at in ms."""
    payloads = [b'{"keyId":"%d","text":"ol\xc3\xa1"}' % i for i in range(500)]
    harness.put(0, payloads)
    harness.writer.start()
    wait_for(lambda: harness.stats[0].forwarded == 500, what="500 forwarded")
    entries = xrange(redis_client, "main:messages.upsert")
    assert [fields[b"data"] for _, fields in entries] == payloads
    assert entries[0][1] == {
        b"data": payloads[0],
        b"event": b"messages.upsert",
        b"source": b"main",
        b"received_at": b"1700000000123",
    }
    assert sum(harness.stats[0].latency.counts) == 500


def test_resending_a_batch_whose_reply_was_lost_writes_nothing_twice(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """The same offsets written again (as after a timeout) are skipped by the high-water mark."""
    harness.put(0, [b"[1]", b"[2]", b"[3]"])
    batch = harness.spool.peek(10, 0)
    assert harness.writer._write(batch)
    assert harness.writer._write(batch)  # the retry after an ambiguous failure
    harness.put(1, [b"[4]"])
    batch2 = harness.spool.peek(10, 0)
    # The spool still holds the first three (never committed here) plus the new one:
    # only the new offset is applied.
    assert batch2[:3] == batch
    assert harness.writer._write(batch2)
    assert redis_client.xlen("main:messages.upsert") == 3
    assert redis_client.xlen("main:chats.upsert") == 1


def test_invalid_frames_go_to_the_dead_letter_stream_and_the_rest_flow(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """Bad JSON, binary and oversized frames are dead-lettered with a reason and raw bytes."""
    harness.put(0, [b"[1]", b"{oops", b"[2]"])
    harness.put(0, [b"\x00\x01"], opcode=Opcode.BINARY)
    big = Oversized(Opcode.TEXT, 99_999_999, b'{"a":"xxxx', "ab" * 32)
    assert harness.spool.append([Entry(0, Opcode.TEXT, big, 1.5)], 10)
    harness.writer.start()
    wait_for(lambda: sum(harness.stats[0].invalid.values()) == 3, what="3 dead letters")
    assert [f[b"data"] for _, f in xrange(redis_client, "main:messages.upsert")] == [b"[1]", b"[2]"]
    dead = [f for _, f in xrange(redis_client, "main:messages.upsert:dlq")]
    assert [d[b"reason"] for d in dead] == [b"invalid_json", b"binary", b"too_large"]
    assert base64.b64decode(dead[0][b"data_base64"]) == b"{oops"
    assert dead[2][b"size"] == b"99999999"
    assert dead[2][b"truncated"] == b"1"
    assert dead[2][b"sha256"] == b"ab" * 32
    assert harness.stats[0].invalid == {"invalid_json": 1, "binary": 1, "too_large": 1}
    assert harness.stats[0].forwarded == 2


def test_wrongtype_stops_writes_keeps_everything_and_resumes_when_fixed(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """WRONGTYPE is a configuration error: nothing is skipped or lost, writes resume after a fix."""
    redis_client.set("main:chats.upsert", "not a stream")
    harness.put(0, [b"[1]"])
    harness.put(1, [b"[2]"])
    harness.put(0, [b"[3]"])
    batch = harness.spool.peek(10, 0)
    harness.writer._abandon.set()  # one attempt only: _write gives up instead of waiting 30 s
    assert not harness.writer._write(batch)
    assert harness.writer_stats.errors["wrongtype"] == 1
    assert "WRONGTYPE" in (harness.writer_stats.config_error or "")
    assert harness.spool.pending()[0] == 3
    assert redis_client.xlen("main:messages.upsert") == 1  # the entry before the bad one
    redis_client.delete("main:chats.upsert")
    harness.writer._abandon.clear()
    assert harness.writer._write(batch)
    assert [f[b"data"] for _, f in xrange(redis_client, "main:messages.upsert")] == [b"[1]", b"[3]"]
    assert redis_client.xlen("main:chats.upsert") == 1
    assert harness.writer_stats.config_error is None


def test_writes_wait_for_redis_to_come_back_and_lose_nothing(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """With Redis down the writer retries with backoff; on its return every frame lands once."""
    server = RedisServer(tmp_path)
    server.start()
    config = make_config({"main": ["messages.upsert"]})
    client = make_target(RedisConfig(url=server.url, socket_timeout=1.0))
    h = Harness(config, client, tmp_path / "spool")
    try:
        h.writer.start()
        h.put(0, [b"[0]"])
        wait_for(lambda: h.stats[0].forwarded == 1, what="first frame")
        server.stop()
        h.put(0, [b"[%d]" % i for i in range(1, 200)])
        wait_for(lambda: h.writer_stats.errors["connection"] > 0, what="a connection error")
        assert h.spool.pending()[0] == 199
        server.start()  # same port, empty database (no persistence in tests)
        wait_for(lambda: h.stats[0].forwarded == 200, 20.0, "all frames after the restart")
        check = server.client()
        assert check.xlen("main:messages.upsert") == 199
        check.close()
    finally:
        h.close()
        client.close()
        server.stop()


def test_gap_records_go_to_the_gap_stream_in_order_with_the_frames(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """A GAP entry lands in forwarder:gaps with source, event and its fields; frames flow on."""
    record = b'{"start":1700000000000,"end":1700000005000,"cause":"close:1006"}'
    harness.put(0, [b"[1]"])
    assert harness.spool.append([Entry(0, GAP, record, 1_700_000_005.0)], len(record))
    harness.put(0, [b"[2]"])
    harness.writer.start()
    wait_for(lambda: harness.stats[0].gaps_recorded == 1, what="gap recorded")
    wait_for(lambda: harness.stats[0].forwarded == 2, what="frames forwarded")
    ((_, gap),) = xrange(redis_client, "forwarder:gaps")
    assert gap == {
        b"source": b"main",
        b"event": b"messages.upsert",
        b"start": b"1700000000000",
        b"end": b"1700000005000",
        b"cause": b"close:1006",
    }


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (rex.TimeoutError("Timeout reading from socket"), "timeout"),
        (rex.ConnectionError("Error 111 connecting"), "connection"),
        (rex.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
        (rex.ReadOnlyError("You can't write against a read only replica."), "readonly"),
        (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "oom"),
        (rex.NoPermissionError("this user has no permissions"), "noperm"),
        (rex.ResponseError("WRONGTYPE Operation against a key"), "wrongtype"),
        (rex.ResponseError("BUSY Redis is busy running a script"), "busy"),
        (rex.ResponseError("MASTERDOWN Link with MASTER is down"), "readonly"),
        (rex.ResponseError("ERR something else"), "other"),
    ],
)
def test_error_kinds(exc: Exception, kind: str) -> None:
    """Each Redis failure maps to one bounded metric label, whatever redis-py did to its text."""
    assert error_kind(exc) == kind


EXHAUSTED = "18446744073709551615-18446744073709551615"  # the last stream ID there is


def test_a_refusal_before_a_wrongtype_stop_is_dead_lettered_and_never_counted_forwarded(
    harness: Harness, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stream refuses XADD on its merits, another turns WRONGTYPE: nothing is lost or
    miscounted once the key is fixed."""
    monkeypatch.setattr(sink, "CONFIG_ERROR_RETRY_SECONDS", 0.2)
    # messages.upsert cannot take another entry; chats.upsert becomes a string mid-run.
    redis_client.xadd("main:messages.upsert", {"x": "1"}, id=EXHAUSTED)
    harness.put(1, [b"[0]"])
    harness.writer.start()
    wait_for(lambda: harness.stats[1].forwarded == 1, what="the first frame")
    redis_client.delete("main:chats.upsert")
    redis_client.set("main:chats.upsert", "not a stream")
    harness.put(0, [b"[1]"])  # refused: the stream is exhausted
    harness.put(1, [b"[2]"])  # stops the batch: WRONGTYPE
    harness.put(0, [b"[3]"])
    wait_for(lambda: harness.writer_stats.errors["wrongtype"] >= 2, what="WRONGTYPE retried")
    redis_client.delete("main:chats.upsert")  # the operator fixes the key
    wait_for(lambda: harness.spool.pending()[0] == 0, what="the spool drained")
    dead = xrange(redis_client, "main:messages.upsert:dlq")
    assert [base64.b64decode(f[b"data_base64"]) for _, f in dead] == [b"[1]", b"[3]"]
    assert {f[b"reason"] for _, f in dead} == {b"redis_rejected"}
    assert all(b"exhausted" in f[b"error"] for _, f in dead)
    assert [f[b"data"] for _, f in xrange(redis_client, "main:chats.upsert")] == [b"[2]"]
    # forwarded counts what the streams hold, nothing more.
    assert harness.stats[0].forwarded == 0
    assert harness.stats[0].invalid == {"redis_rejected": 2}
    assert harness.stats[1].forwarded == 2
    assert harness.stats[0].lost == harness.stats[1].lost == 0


def test_a_refusal_whose_reply_was_lost_is_still_dead_lettered(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """The mark remembers refusals: a batch re-sent after a lost reply dead-letters them."""
    redis_client.xadd("main:messages.upsert", {"x": "1"}, id=EXHAUSTED)
    harness.put(0, [b"[1]"])
    harness.put(1, [b"[2]"])
    batch = harness.spool.peek(10, 0)
    call = harness.writer._packer.pack(batch, {}, 1)
    harness.writer._evalsha(call.keys, call.args)  # applied; its reply "lost" (never read)
    assert harness.writer._write(batch) == 2  # the re-send
    dead = xrange(redis_client, "main:messages.upsert:dlq")
    assert [base64.b64decode(f[b"data_base64"]) for _, f in dead] == [b"[1]"]
    assert redis_client.xlen("main:chats.upsert") == 1


def test_replays_of_a_previous_run_are_not_counted_as_forwarded(
    make_config: ConfigFactory, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Entries Redis stored before a restart are skipped and counted as replayed, not forwarded."""
    config = make_config({"main": ["messages.upsert"]})
    client = make_target(config.redis)
    first = Harness(config, client, tmp_path / "spool")
    first.put(0, [b"[1]", b"[2]", b"[3]"])
    assert first.writer._write(first.spool.peek(10, 0)) == 3  # stored, never committed
    first.spool.close()  # as if the process died before the commit
    second = Harness(config, client, tmp_path / "spool")
    try:
        second.writer.start()
        wait_for(lambda: second.spool.pending()[0] == 0, what="the replay settled")
        assert redis_client.xlen("main:messages.upsert") == 3
        assert second.stats[0].forwarded == 0
        assert second.writer_stats.replayed == 3
    finally:
        second.close()
        client.close()


def slow_harness(
    make_config: ConfigFactory, proxy: SlowReplyProxy, tmp_path: Path, batch_max: int = 1000
) -> tuple[Harness, RedisTarget]:
    config = make_config({"main": ["messages.upsert"]})
    cfg = RedisConfig(
        url=f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1.0, batch_max=batch_max
    )
    client = make_target(cfg)
    return Harness(replace(config, redis=cfg), client, tmp_path / "spool"), client


@pytest.mark.slow
def test_a_redis_slower_than_socket_timeout_still_gets_every_frame(
    make_config: ConfigFactory,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replies 1.5 s late with a 1.0 s timeout: the writer waits longer, says so, loses nothing."""
    # Every batch (an EVALSHA is over 120 bytes) is answered 1.5 s late; the connection
    # handshake's small commands are not, so that the test measures the writes.
    proxy = SlowReplyProxy(redis_server.port, lambda size: 1.5 if size > 120 else 0.0)
    proxy.start()
    h, client = slow_harness(make_config, proxy, tmp_path)
    try:
        payloads = [b"[%d]" % i for i in range(300)]
        h.put(0, payloads)
        h.writer.start()
        wait_for(lambda: h.stats[0].forwarded == 300, 30, "every frame confirmed")
        got = [f[b"data"] for _, f in xrange(redis_client, "main:messages.upsert")]
        assert got == payloads
        assert h.writer_stats.errors["timeout"] >= 1
        assert "did not answer a batch" in caplog.text
    finally:
        h.close()
        client.close()
        proxy.stop()


@pytest.mark.slow
def test_batches_shrink_while_big_ones_time_out_and_grow_back_after(
    make_config: ConfigFactory,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """Big requests get no answer in time: smaller batches go through, then sizes grow back."""
    slow = threading.Event()
    slow.set()
    # Requests over 4 KiB are answered after 30 s (far beyond any patience), others at once.
    proxy = SlowReplyProxy(
        redis_server.port, lambda size: 30.0 if slow.is_set() and size > 4096 else 0.0
    )
    proxy.start()
    h, client = slow_harness(make_config, proxy, tmp_path, batch_max=64)
    try:
        payloads = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * 200) for i in range(400)]
        h.put(0, payloads)
        h.writer.start()
        wait_for(lambda: h.stats[0].forwarded == 400, 60, "every frame confirmed")
        assert h.writer._pacer.limit < 64
        slow.clear()
        more = [b"[%d]" % i for i in range(1000)]
        for i in range(0, 1000, 10):  # bounded: 100 appends while the limit grows back
            h.put(0, more[i : i + 10])
        wait_for(lambda: h.stats[0].forwarded == 1400, 30, "the rest confirmed")
        wait_for(lambda: h.writer._pacer.limit == 64, 10, "batches back to batch_max")
        got = [f[b"data"] for _, f in xrange(redis_client, "main:messages.upsert")]
        assert got == payloads + more
    finally:
        h.close()
        client.close()
        proxy.stop()

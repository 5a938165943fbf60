"""The Redis writer against a real redis-server: fields, order, idempotence, dead letters."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from forwarder.config import Config, RedisConfig
from forwarder.frames import Opcode, Oversized
from forwarder.sink import RedisWriter, make_client
from forwarder.spool import GAP, Entry, MemorySpool
from forwarder.stats import SubscriptionStats, WriterStats
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for, xrange


class Harness:
    """A writer over a spool, for two subscriptions of one source."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.subs = config.subscriptions()
        self.stats = [SubscriptionStats(s.source.name, s.event, s.stream) for s in self.subs]
        self.writer_stats = WriterStats()
        self.spool = MemorySpool(1 << 20)
        self.writer = RedisWriter(
            client,
            self.spool,
            self.subs,
            self.stats,
            self.writer_stats,
            config.redis,
            "test-writer",
            rand=lambda: 0.0,
        )

    def put(self, sub: int, payloads: list[bytes], opcode: int = Opcode.TEXT) -> None:
        entries = [Entry(sub, opcode, p, 1_700_000_000.123) for p in payloads]
        assert self.spool.append(entries, sum(len(p) for p in payloads))


@pytest.fixture
def harness(make_config: ConfigFactory, redis_server: RedisServer) -> Iterator[Harness]:
    config = make_config({"main": ["messages.upsert", "chats.upsert"]})
    client = make_client(RedisConfig(url=redis_server.url))
    h = Harness(config, client)
    yield h
    h.writer.stop(time.monotonic() + 2)
    h.writer.join(5)
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
    offset, batch = harness.spool.peek(10, 0)
    assert harness.writer._write(offset, batch)
    assert harness.writer._write(offset, batch)  # the retry after an ambiguous failure
    harness.put(1, [b"[4]"])
    offset2, batch2 = harness.spool.peek(10, 0)
    # The spool still holds the first three (never committed here) plus the new one:
    # only the new offset is applied.
    assert offset2 == offset
    assert harness.writer._write(offset2, batch2)
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


def test_an_entry_redis_refuses_is_dead_lettered_without_blocking_others(
    harness: Harness, redis_client: redis.Redis
) -> None:
    """WRONGTYPE on one stream key dead-letters its frames; the other stream keeps flowing."""
    redis_client.set("main:messages.upsert", "not a stream")
    harness.put(0, [b"[1]"])
    harness.put(1, [b"[2]"])
    harness.writer.start()
    wait_for(lambda: harness.stats[0].invalid.get("redis_rejected") == 1, what="dead letter")
    assert redis_client.xlen("main:chats.upsert") == 1
    (_, dead), *_ = xrange(redis_client, "main:messages.upsert:dlq")
    assert dead[b"reason"] == b"redis_rejected"
    assert b"WRONGTYPE" in dead[b"error"]


def test_writes_wait_for_redis_to_come_back_and_lose_nothing(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """With Redis down the writer retries with backoff; on its return every frame lands once."""
    server = RedisServer(tmp_path)
    server.start()
    config = make_config({"main": ["messages.upsert"]})
    client = make_client(RedisConfig(url=server.url, socket_timeout=1.0))
    h = Harness(config, client)
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
        h.writer.stop(time.monotonic() + 1)
        h.writer.join(5)
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

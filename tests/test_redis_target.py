"""Choosing and addressing the Redis topology: URLs, hash slots, and the upgrade path of the
high-water mark from one key per spool to one key per stream."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from forwarder.config import RedisConfig, redis_hosts
from forwarder.errors import ConfigError
from forwarder.redis_target import ClusterTarget, SentinelTarget, SingleTarget, make_target
from forwarder.script import Packer, legacy_mark_key, mark_key, slot
from forwarder.sink import RedisWriter
from forwarder.spool import DiskSpool, Entry, Route
from forwarder.stats import SubscriptionStats, WriterStats
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for, xrange


def test_the_url_scheme_chooses_the_topology() -> None:
    """redis:// is one Redis, redis+sentinel:// Sentinel, redis+cluster:// (or cluster) Cluster."""
    assert isinstance(make_target(RedisConfig(url="redis://127.0.0.1:1/0")), SingleTarget)
    sentinel = make_target(RedisConfig(url="redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/3"))
    assert isinstance(sentinel, SentinelTarget)
    assert sentinel.describe() == {"topology": "sentinel", "masters": [], "service": "svc"}
    assert isinstance(make_target(RedisConfig(url="redis+cluster://127.0.0.1:1")), ClusterTarget)
    assert isinstance(
        make_target(RedisConfig(url="redis://127.0.0.1:1", cluster=True)), ClusterTarget
    )


def test_multi_host_urls_list_every_host() -> None:
    """Comma-separated hosts, default ports per scheme, credentials before the @."""
    assert redis_hosts("redis+sentinel://u:p@h1:26380,h2/svc") == [("h1", 26380), ("h2", 26379)]
    assert redis_hosts("redis+cluster://a:7000,b:7001") == [("a", 7000), ("b", 7001)]
    with pytest.raises(ConfigError, match="host:port"):
        redis_hosts("redis+cluster://a:7000,:x")


@pytest.mark.parametrize(
    ("url", "extra", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "", "SERVICE"),
        ("redis+sentinel://127.0.0.1:26379/svc/x", "", "database must be a number"),
        ("redis+cluster://127.0.0.1:7000/3", "", "one database"),
        ("redis+cluster://127.0.0.1:99999", "", "out of range"),
        ("unix:///tmp/redis.sock", "cluster = true", "redis.cluster"),
        ("redis+cluster://127.0.0.1:7000?x=1", "", "query"),
        ("redis://127.0.0.1:7000", "wait_replicas = 1\nwait_timeout = 5.0", "below"),
    ],
)
def test_bad_topology_settings_are_config_errors(
    make_config: ConfigFactory, url: str, extra: str, message: str
) -> None:
    """A malformed Sentinel or Cluster setting is refused at load with the key and why."""
    with pytest.raises(ConfigError, match=message):
        make_config(environ={"FORWARDER_REDIS_URL": url}, redis_extra=extra)


def test_a_cluster_batch_is_one_call_per_slot_with_its_marks_in_that_slot() -> None:
    """On a cluster every call's keys share one hash slot; elsewhere the batch is one call."""
    routes = [Route("main", e, f"main:{e}", f"main:{e}:dlq") for e in ("a", "b", "c", "d")]
    batch = [(i + 1, Entry(i % 4, 1, b"[%d]" % i, 1.0)) for i in range(40)]
    batch.append((41, Entry(0, 1, b"{bad", 1.0)))  # to main:a:dlq, another slot
    cluster = Packer(routes, None, "forwarder:gaps", "w1", cluster=True)
    groups = cluster.groups(batch, {})
    assert len(groups) == 5
    for group in groups:
        offsets = [offset for offset, _ in group]
        assert offsets == sorted(offsets)
        call = cluster.pack(group, {}, 1)
        assert len({slot(key) for key in call.keys}) == 1, call.keys
    single = Packer(routes, None, "forwarder:gaps", "w1")
    assert single.groups(batch, {}) == [batch]
    call = single.pack(batch, {}, 1)
    assert call.keys[-1] == legacy_mark_key("w1")  # the previous version's mark, as a floor
    assert mark_key("main:a", "w1") in call.keys


def test_entries_the_previous_version_marked_are_not_written_again(
    make_config: ConfigFactory, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Upgrade: a spool whose entries 1-3 the old per-spool mark covers writes only 4 and 5."""
    config = make_config({"main": ["messages.upsert"]})
    sub = config.subscriptions()[0]
    spool = DiskSpool(
        tmp_path / "spool",
        [Route(sub.source.name, sub.event, sub.stream, sub.dead_letter_stream)],
        max_bytes=1 << 30,
    )
    payloads = [b"[%d]" % i for i in range(1, 6)]
    assert spool.append([Entry(0, 1, p, 1.0) for p in payloads], 15)
    # What the previous version left after writing offsets 1-3 and stopping before its commit.
    for p in payloads[:3]:
        redis_client.xadd(sub.stream, {"data": p})
    redis_client.set(legacy_mark_key(spool.writer_id), 3, ex=3600)
    stats = [SubscriptionStats(sub.source.name, sub.event, sub.stream)]
    writer_stats = WriterStats()
    target = make_target(config.redis)
    writer = RedisWriter(target, spool, stats, writer_stats, config.redis, rand=lambda: 0.0)
    writer.start()
    try:
        wait_for(lambda: spool.pending()[0] == 0, what="the spool drained")
    finally:
        writer.stop(time.monotonic() + 2)
        writer.join(5)
        spool.close()
        target.close()
    assert [f[b"data"] for _, f in xrange(redis_client, sub.stream)] == payloads
    assert stats[0].forwarded == 2
    assert writer_stats.replayed == 3
    assert redis_client.get(mark_key(sub.stream, spool.writer_id)) == b"5"


def test_status_names_the_topology_and_the_master(redis_server: RedisServer) -> None:
    """/status shows topology "single" and the host:port the writer last wrote to."""
    target = make_target(RedisConfig(url=redis_server.url))
    try:
        assert target.describe() == {"topology": "single", "masters": []}
        pool, conn = target.connection("k")
        target.wrote(conn)
        pool.release(conn)
        assert target.describe()["masters"] == [f"127.0.0.1:{redis_server.port}"]
    finally:
        target.close()

"""Redis Cluster: one script call per hash slot, the marks in their streams' slots, and
failovers and a slot migration under traffic that lose and duplicate nothing.

3 masters and 3 replicas on loopback, made with `redis-cli --cluster create`. 13 events from
2 sources (26 streams over many slots), written as the least-privilege ACL user of the
README. `wait_replicas = 1`: a batch the spool lets go is on the slot's replica too, so a
master's SIGKILL loses none of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.cluster import ClusterNode, RedisCluster

from forwarder.daemon import Forwarder
from forwarder.script import mark_key, slot
from forwarder_sim import Simulator
from forwarder_sim.payloads import ALLOWED_EVENTS
from tests.conftest import ConfigFactory
from tests.helpers import ClusterNodes, grant, wait_for, xrange
from tests.test_acl import ACL_RULE_CLUSTER, ACL_USER

pytestmark = [pytest.mark.slow, pytest.mark.fault]

EVENTS = sorted(ALLOWED_EVENTS)[:13]
SOURCES = ("main", "second")
RATE = 6.0  # frames/s per subscription: ~160 frames/s in all, on a shared 2-core machine
PASSWORD = secrets.token_hex(16)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterNodes]:
    (tmp_path / "cluster").mkdir()
    nodes = ClusterNodes(tmp_path / "cluster")
    try:
        nodes.start()
        for node in nodes.nodes:
            grant(node, ACL_USER, PASSWORD, ACL_RULE_CLUSTER)
        yield nodes
    finally:
        nodes.stop()


def oracle_client(cluster: ClusterNodes) -> RedisCluster:
    node = next(n for n in cluster.nodes if n.proc is not None)
    return RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", node.port)],  # type: ignore[no-untyped-call]
        socket_timeout=5,
    )


def forwarded(forwarder: Forwarder) -> int:
    return sum(s.forwarded for s in forwarder.stats)


def test_mark_keys_share_their_streams_slots() -> None:
    """Each stream's mark hashes to the stream's slot, with or without a hash tag in it."""
    for stream in ("main:messages.upsert", "{main}:messages.upsert", "wa:{x}", "a}b", "a{}b"):
        key = mark_key(stream, "w1")
        assert slot(key) == slot(stream), (stream, key)
    assert mark_key("main:messages.upsert", "w1") == "forwarder:hwm:{main:messages.upsert}:w1"
    assert mark_key("{main}:x", "w1") == "forwarder:hwm:{main}:w1:{main}:x"


def test_failover_kill_and_migration_under_traffic_lose_and_duplicate_nothing(
    cluster: ClusterNodes,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """CLUSTER FAILOVER, SIGKILL of a master and a slot migration: every frame once, in order."""
    seeds = ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes[:2])
    config = make_config(
        {source: EVENTS for source in SOURCES},
        stream="wa:{source}:{event}",
        # As the least-privilege user of the README (Redis ACL, Cluster).
        environ={"FORWARDER_REDIS_URL": f"redis+cluster://{ACL_USER}:{PASSWORD}@{seeds}"},
        redis_extra="socket_timeout = 1.0\nwait_replicas = 1\nwait_timeout = 0.5",
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: all(s.state.value == "connected" for s in forwarder.stats), 20, "connected")
    for source in SOURCES:
        for event in EVENTS:
            simulator.set_rate(event, RATE, instance=source)

    def progress(more: int, what: str) -> None:
        done = forwarded(forwarder)
        wait_for(lambda: forwarded(forwarder) >= done + more, 40, what)

    progress(200, "traffic flowing")
    status = forwarder.status()[1]["redis"]
    assert status["topology"] == "cluster"
    assert len(status["masters"]) == 3

    # 1. A planned failover: a replica takes over its master's slots.
    replica = next(port for port, role in cluster.roles().items() if role == "slave")
    admin = cluster.node(replica).client()
    admin.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
    admin.close()
    wait_for(lambda: cluster.roles().get(replica) == "master", 20, "the replica promoted")
    progress(200, "writes after CLUSTER FAILOVER")

    # 2. A master dies (SIGKILL): its replica is promoted, then it comes back as a replica.
    victim = cluster.owner(slot(f"wa:main:{EVENTS[0]}"))
    victim.stop()
    wait_for(
        lambda: cluster.owner(slot(f"wa:main:{EVENTS[0]}")).port != victim.port,
        30,
        "the killed master's replica promoted",
    )
    victim.start()  # rejoins from its nodes.conf, as a replica of its old slots' new master
    grant(victim, ACL_USER, PASSWORD, ACL_RULE_CLUSTER)  # ACLs are not in nodes.conf
    wait_for(cluster.healthy, 30, "the cluster ok again")
    progress(200, "writes after the SIGKILL")

    # 3. A slot migration: the stream and its mark move to another master (ASK, TRYAGAIN,
    #    then MOVED for the writer).
    moving = f"wa:second:{EVENTS[0]}"
    before = cluster.owner(slot(moving))
    roles = cluster.roles()
    target = next(
        cluster.node(port)
        for port, role in roles.items()
        if role == "master" and port != before.port
    )
    moved = cluster.migrate_slot(slot(moving), before, target)
    assert moved >= 2  # at least the stream and its mark
    assert cluster.owner(slot(moving)).port == target.port
    progress(200, "writes after the migration")

    for source_name in SOURCES:
        for event in EVENTS:
            simulator.set_rate(event, 0.0, instance=source_name)
    delivered = {(s, e): simulator.delivered_frames(s, e) for s in SOURCES for e in EVENTS}
    total = sum(len(frames) for frames in delivered.values())
    wait_for(lambda: forwarded(forwarder) == total, 60, "every frame confirmed")
    check = oracle_client(cluster)
    try:
        for (source_name, event), frames in delivered.items():
            got = [f[b"data"] for _, f in xrange(check, f"wa:{source_name}:{event}")]  # type: ignore[arg-type]
            assert len(got) == len(set(got)), f"duplicates in {source_name}:{event}"
            assert got == frames, f"{source_name}:{event}"
    finally:
        check.close()
    errors = forwarder.writer_stats.errors
    assert errors["cluster"] + errors["connection"] + errors["readonly"] > 0
    assert forwarder.writer_stats.replayed == 0

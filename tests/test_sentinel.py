"""Redis behind Sentinel: failovers under traffic lose and duplicate nothing, as the
least-privilege ACL user of the README.

1 master, 1 replica and 3 Sentinels on loopback. The writer asks the Sentinels for the
master, WAITs for the replica after each batch (`wait_replicas = 1`: a batch the spool lets
go is on both nodes, so its frames and its high-water mark survive the master's death), and
treats a demoted master's READONLY as transient.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from forwarder.daemon import Forwarder
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, SentinelServer, grant, wait_for, xrange
from tests.test_acl import ACL_RULE_REPLICATED, ACL_USER

pytestmark = [pytest.mark.slow, pytest.mark.fault]

SERVICE = "fwd"
EVENT = "messages.upsert"
STREAM = f"wa:main:{EVENT}"
PASSWORD = secrets.token_hex(16)


@dataclass
class SentinelSetup:
    nodes: list[RedisServer]  # the first started as master
    sentinels: list[SentinelServer]

    @property
    def url(self) -> str:
        """As the least-privilege user (README, Redis ACL) on the master; Sentinels open."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{ACL_USER}:{PASSWORD}@{hosts}/{SERVICE}/0"

    def grant(self, node: RedisServer) -> None:
        grant(node, ACL_USER, PASSWORD, ACL_RULE_REPLICATED)

    def master_port(self) -> int:
        """The master the Sentinels agree on (the first one that answers)."""
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            client = sentinel.client()
            try:
                reply = client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                return int(reply[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise AssertionError("no Sentinel answered")

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def replicas_online(self, master: RedisServer) -> int:
        client = master.client()
        try:
            return int(client.info("replication").get("connected_slaves", 0))
        except redis.RedisError:
            return 0
        finally:
            client.close()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    master = RedisServer(tmp_path / "master")
    master.start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    sentinels = []
    for i in range(3):
        (tmp_path / f"sentinel{i}").mkdir()
        sentinels.append(SentinelServer(tmp_path / f"sentinel{i}", SERVICE, master.port))
    setup = SentinelSetup([master, replica], sentinels)
    try:
        for node in setup.nodes:
            setup.grant(node)
        for sentinel in sentinels:
            sentinel.start()
        wait_for(lambda: setup.replicas_online(master) == 1, 15, "the replica in sync")
        yield setup
    finally:
        for sentinel in sentinels:
            sentinel.stop()
        for node in setup.nodes:
            node.stop()


def in_redis(node: RedisServer) -> list[bytes]:
    client = node.client()
    try:
        return [fields[b"data"] for _, fields in xrange(client, STREAM)]
    finally:
        client.close()


def test_failovers_under_traffic_lose_and_duplicate_nothing(
    sentinel_setup: SentinelSetup,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """SENTINEL FAILOVER, then SIGKILL of the new master: every frame once, in order."""
    setup = sentinel_setup
    config = make_config(
        {"main": [EVENT]},
        stream="wa:{source}:{event}",
        environ={"FORWARDER_REDIS_URL": setup.url},
        redis_extra="socket_timeout = 1.0\nwait_replicas = 1\nwait_timeout = 0.5",
    )
    forwarder = run_forwarder(config)
    stats = forwarder.stats[0]
    wait_for(lambda: stats.state.value == "connected", 10, "connected")
    simulator.set_rate(EVENT, 200, instance="main")
    wait_for(lambda: stats.forwarded > 100, 15, "traffic flowing")
    first = setup.master_port()
    assert forwarder.status()[1]["redis"]["topology"] == "sentinel"
    assert forwarder.status()[1]["redis"]["masters"] == [f"127.0.0.1:{first}"]

    # 1. A planned failover: the old master becomes a replica (READONLY to late writers).
    admin = setup.sentinels[0].client()
    admin.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
    admin.close()
    wait_for(lambda: setup.master_port() != first, 20, "the Sentinels to name a new master")
    second = setup.master_port()
    done = stats.forwarded
    wait_for(lambda: stats.forwarded > done + 100, 20, "writes to the new master")
    wait_for(
        lambda: forwarder.status()[1]["redis"]["masters"] == [f"127.0.0.1:{second}"],
        10,
        "/status naming the new master",
    )

    # 2. The new master dies (SIGKILL): whatever it confirmed is on its replica (WAIT 1).
    setup.node(second).stop()
    wait_for(lambda: setup.master_port() == first, 30, "failover back to the first node")
    # With no replica online, WAIT 1 cannot be met: batches wait in the spool.
    setup.node(second).start()  # empty, and made a replica of the new master by Sentinel
    setup.grant(setup.node(second))
    wait_for(lambda: setup.replicas_online(setup.node(first)) == 1, 30, "a replica again")
    wait_for(lambda: stats.forwarded > done + 200, 30, "writes flowing again")

    simulator.set_rate(EVENT, 0.0, instance="main")
    delivered = simulator.delivered_frames("main", EVENT)
    wait_for(lambda: stats.forwarded == len(delivered), 30, "every frame confirmed")
    got = in_redis(setup.node(first))
    assert len(got) == len(set(got)), "duplicates in Redis"
    assert got == delivered
    assert (
        forwarder.writer_stats.errors["connection"] + forwarder.writer_stats.errors["readonly"] > 0
    )
    # The replica has the same: the stream and its mark live on both.
    wait_for(lambda: in_redis(setup.node(second)) == delivered, 15, "the replica caught up")

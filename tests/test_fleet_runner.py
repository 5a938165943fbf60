"""FleetThread against a real redis-server: members racing, failing over, restarting Redis.

Short leases (lease_ttl 2 s) keep these quick; every wait is a condition with a deadline.
A checker thread samples the members' own views and Redis all along and records any moment
at which one subscription had two lease holders.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from forwarder.config import RedisConfig
from forwarder.fleet.config import FleetConfig
from forwarder.fleet.keys import FleetKeys, Key, Token
from forwarder.fleet.member import FleetMember
from forwarder.fleet.protocol import (
    ChangeReply,
    ChangeRequest,
    HeartbeatReply,
    HeartbeatRequest,
    MemberRecord,
)
from forwarder.fleet.runner import FleetThread
from forwarder.fleet.store import RedisFleetStore, fleet_client
from tests.fleet_harness import Obedient, Upstream, keys
from tests.helpers import RedisServer, wait_for

CONFIG = FleetConfig(enabled=True, lease_ttl=2.0, renew_interval=0.4, margin=0.5)
KEYS = keys(60)


class GatedStore:
    """A store whose calls wait while the gate is closed (a member stalled mid-round)."""

    def __init__(self, inner: RedisFleetStore) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.rounds = 0

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatReply:
        assert self.gate.wait(10.0), "gate left closed"
        self.rounds += 1
        return self.inner.heartbeat(request)

    def change(self, member: MemberRecord, request: ChangeRequest) -> ChangeReply:
        assert self.gate.wait(10.0), "gate left closed"
        return self.inner.change(member, request)

    def leave(self, member: MemberRecord) -> None:
        self.inner.leave(member)


class Fleet:
    """Members on one real Redis, each with its own thread, store and obedient daemon."""

    def __init__(self, server: RedisServer, config: FleetConfig = CONFIG) -> None:
        self.server = server
        self.config = config
        self.upstream = Upstream()
        self.threads: dict[str, FleetThread] = {}
        self.stores: dict[str, GatedStore] = {}
        self.daemons: dict[str, Obedient] = {}
        self.clients: list[redis.Redis] = []
        self.violations: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._checker = threading.Thread(target=self._check_loop, name="checker", daemon=True)
        self._admin = server.client()
        self._keys = FleetKeys(config.group)

    def start_epoch_in_the_past(self) -> None:
        """Skip the first epoch's quiet period (as if the group had existed for an hour)."""
        seconds, _ = self._admin.time()
        self._admin.set(self._keys.epoch, (int(seconds) - 3600) * 1000)

    def add(self, name: str, start: bool = True) -> FleetThread:
        member = FleetMember(self.config, name=name)
        member.set_candidates(KEYS)
        client = fleet_client(RedisConfig(url=self.server.url, socket_timeout=1.0), self.config)
        self.clients.append(client)
        daemon = Obedient(member, self.upstream)
        store = self.stores[name] = GatedStore(RedisFleetStore(client, self.config))
        thread = FleetThread(member, store, daemon.apply)
        self.threads[name] = thread
        self.daemons[name] = daemon
        if start:
            thread.start()
        return thread

    @property
    def members(self) -> list[FleetMember]:
        """Every member, stopped ones too: a member whose thread died (kill -9, SIGSTOP)
        still answers from its own clock, and must have given up before anyone took over."""
        return [t.member for t in self.threads.values()]

    def start_checking(self) -> None:
        self._checker.start()

    def _check_loop(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.check()
            except redis.RedisError:  # Redis is being restarted: still check the members
                self.check_local()

    def check_local(self) -> dict[str, dict[Key, int]]:
        """Member A's view, then B's, then A's again: a key A held with the same fence
        before and after B claimed it means two holders at once."""
        members = self.members
        first = {m.name: m.leases() for m in members}
        second = {m.name: m.leases() for m in members}
        for m in members:
            for key, fence in first[m.name].items():
                for other in members:
                    if other is m or key not in second[other.name]:
                        continue
                    if m.leases().get(key) == fence:
                        self.violations.append(f"{key} held by {m.name} and {other.name}")
        self.checks += 1
        return second

    def check(self) -> None:
        """Redis first, then the members: nobody may run a lease that Redis had already
        given to someone else with a fence at least as high."""
        raw = self._admin.mget([self._keys.lease(k) for k in KEYS])
        in_redis = {
            k: Token.parse(v.decode() if isinstance(v, bytes) else str(v))
            for k, v in zip(KEYS, raw, strict=True)
            if v is not None
        }
        local = self.check_local()
        for name, leases in local.items():
            for key, fence in leases.items():
                seen = in_redis.get(key)
                if seen is not None and seen.member != name and seen.fence >= fence:
                    self.violations.append(f"{key}: {name} runs fence {fence}, Redis had {seen}")

    def owned_once(self) -> bool:
        counts: dict[Key, int] = {}
        for m in self.members:
            for key in m.leases():
                counts[key] = counts.get(key, 0) + 1
        return all(counts.get(k) == 1 for k in KEYS)

    def settled(self) -> bool:
        """Every lease owned once, by the member the assignment names, no move under way."""
        live = [t.member for t in self.threads.values() if t.is_alive()]
        return self.owned_once() and all(
            m.stats.moving == 0 and m.stats.successor == 0 and m.leases() for m in live
        )

    def close(self) -> None:
        self._stop.set()
        if self._checker.is_alive():
            self._checker.join(5)
        for thread in self.threads.values():
            thread.stop()
        for thread in self.threads.values():
            thread.join(5)
        for client in self.clients:
            client.close()
        self._admin.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, so it can be killed and restarted."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fleet(own_redis: RedisServer) -> Iterator[Fleet]:
    f = Fleet(own_redis)
    yield f
    f.close()
    assert not f.violations, f.violations[:5]


def wait(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    wait_for(predicate, timeout, what)


@pytest.mark.slow
def test_two_members_racing_for_60_leases_never_share_one(fleet: Fleet) -> None:
    """Both start at once and each first sees only itself, so both go for all 60 leases:
    at every check each lease has one holder, and they end up split by the assignment."""
    fleet.start_epoch_in_the_past()
    barrier = threading.Barrier(2)
    threads = [fleet.add("a", start=False), fleet.add("b", start=False)]
    fleet.start_checking()
    for thread in threads:
        threading.Thread(target=lambda t=thread: (barrier.wait(), t.start())).start()
    wait(fleet.owned_once, "every lease owned exactly once")
    wait(
        lambda: {len(m.leases()) for m in fleet.members} != {0, 60} and fleet.owned_once(),
        "both members holding a share",
    )
    checks = fleet.checks
    wait(lambda: fleet.checks > checks + 200, "more checks while stable")
    assert fleet.owned_once()
    for key in KEYS:
        assert fleet.upstream.feed(key) in {"a", "b"}


@pytest.mark.slow
def test_redis_restart_never_leaves_a_subscription_with_two_owners(
    fleet: Fleet, own_redis: RedisServer
) -> None:
    """Redis killed and started again empty while leases are held. The member that comes
    back first sees only itself, so the assignment hands it everything; it must still not
    acquire what the other runs: holders re-assert their leases, newcomers wait."""
    fleet.start_epoch_in_the_past()
    a = fleet.add("a").member
    b = fleet.add("b").member
    fleet.start_checking()
    wait(fleet.settled, "both holding their share")
    held_by_b = set(b.leases())
    fleet.stores["b"].gate.clear()  # b stalls before its next round trip
    own_redis.stop()  # SIGKILL, no persistence: every key is gone
    own_redis.start()
    rounds = fleet.stores["a"].rounds
    wait(lambda: fleet.stores["a"].rounds >= rounds + 2, "two rounds of a alone")
    assert a.stats.epoch_changes == 1
    assert not set(a.leases()) & held_by_b  # b's leases are b's, though Redis forgot them
    assert set(b.leases()) == held_by_b  # still within b's own deadline
    fleet.stores["b"].gate.set()
    wait(lambda: b.stats.epoch_changes == 1, "b sees the new epoch")
    wait(fleet.owned_once, "every lease owned exactly once again")
    checks = fleet.checks
    wait(lambda: fleet.checks > checks + 200, "more checks after the restart")
    assert set(b.leases()) == held_by_b  # re-asserted, never lost
    assert b.stats.reasserted == len(held_by_b)


@pytest.mark.slow
def test_a_killed_member_is_taken_over_within_the_ttl(fleet: Fleet) -> None:
    """A member that stops without leaving (kill -9): its leases move once they run out,
    with a failover takeover that starts at its last heartbeat."""
    fleet.start_epoch_in_the_past()
    a = fleet.add("a")
    fleet.add("b")
    fleet.start_checking()
    wait(fleet.settled, "both holding their share")
    a_keys = set(a.member.leases())
    a.stop()  # no handover, no release: like a process that died
    a.join(5)
    fleet.daemons["a"].die()
    died = time.monotonic()
    died_wall = time.time()
    b = fleet.threads["b"].member
    wait(lambda: a_keys <= set(b.leases()), "b took a's subscriptions")
    took = time.monotonic() - died
    assert took <= CONFIG.lease_ttl + 5.0
    takeovers = [fleet.daemons["b"].takeovers[k] for k in a_keys]
    assert {(t.cause, t.previous) if t else None for t in takeovers} == {("failover", "a")}
    # The gap starts at a's last heartbeat: within a round of its death.
    for t in takeovers:
        assert t is not None
        assert died_wall - CONFIG.renew_interval - 1.0 <= t.since <= died_wall + 0.1
    assert b.stats.acquisitions["failover"] == len(a_keys)


@pytest.mark.slow
def test_shutdown_hands_everything_over_then_leaves(fleet: Fleet) -> None:
    """SIGTERM path: the successors connect first, then the member releases and leaves."""
    fleet.start_epoch_in_the_past()
    a = fleet.add("a")
    b_thread = fleet.add("b")
    fleet.start_checking()
    wait(fleet.settled, "both holding their share")
    handed = a.shutdown(time.monotonic() + 20.0, time.monotonic)
    assert handed
    assert not a.is_alive()
    b = b_thread.member
    wait(lambda: set(b.leases()) == set(KEYS), "b owns everything")
    assert all(fleet.upstream.feed(k) == "b" for k in KEYS)
    assert a.member.stats.handovers["shutdown"] > 0
    wait(lambda: [m["name"] for m in b.status()["members"]] == ["b"], "a gone from the group")
    assert a.failed is None
    assert b_thread.failed is None

"""Fleet mode end to end: real `forwarder run` processes, a real redis-server, the simulator.

3 members share 60 subscriptions (6 sources x 10 events) under steady traffic. The oracles:
the simulator's slots (one open holder per slot; the count of upgrades per slot, which keeps
growing when two members steal a feed from each other), every member's /status (who owns
what), and the sequence numbers of what the simulator delivered against what is in Redis.
Leases are short (lease_ttl 3 s) so that failovers take seconds.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from forwarder_sim import Simulator
from tests.conftest import SECRET
from tests.fleet_procs import Fleet, compare, gap_records, poll, settle_writes
from tests.helpers import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.fleet]

SOURCES = [f"inst{i}" for i in range(6)]
EVENTS = [
    "messages.upsert",
    "messages.update",
    "send.message",
    "contacts.upsert",
    "presence.update",
    "chats.upsert",
    "chats.update",
    "groups.upsert",
    "groups.update",
    "call.upsert",
]
RATE = 5.0  # frames per second per slot: 300/s in all
LEASE_TTL = 3.0
SETTLE = 45.0  # seconds allowed for a group to settle after a start, on a busy machine
NAMES = ("m1", "m2", "m3")


@pytest.fixture
def fleet_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """This test's own redis-server (some tests restart it)."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fleet_sim() -> Iterator[Simulator]:
    sim = Simulator(secret=SECRET, record=True)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def fleet(tmp_path: Path, fleet_sim: Simulator, fleet_redis: RedisServer) -> Iterator[Fleet]:
    """Three members started and settled: every subscription owned once and held."""
    group = Fleet(
        tmp_path / "fleet", fleet_sim, fleet_redis.url, SOURCES, EVENTS, SECRET, LEASE_TTL
    )
    group.workdir.mkdir()
    try:
        for name in NAMES:
            group.start(name)
        for name in NAMES:
            group.wait_ready(name)
        poll(group.settled, SETTLE, "every subscription owned once and held")
        group.traffic(RATE)
        yield group
    finally:
        group.traffic(0.0)
        group.close()


@pytest.fixture
def client(fleet_redis: RedisServer) -> Iterator[redis.Redis]:
    c = fleet_redis.client()
    yield c
    c.close()


def steady(fleet: Fleet, window: float = 2 * LEASE_TTL) -> None:
    """The settle window: no slot gets a new connection while every slot stays held."""
    before = fleet.connections()
    try:
        poll(lambda: fleet.connections() != before or not fleet.all_held(), window, "a change")
    except AssertionError:
        return  # nothing changed within the window: what we want
    after = fleet.connections()
    moved = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    raise AssertionError(f"slots flapped or lost their holder: {moved or 'holder closed'}")


def settled_with(fleet: Fleet, name: str) -> bool:
    """Settled, and `name` owns a share."""
    return fleet.settled() and bool(fleet.members[name].owned())


def finish(fleet: Fleet, client: redis.Redis) -> None:
    """Stop the traffic and wait until what was delivered is written."""
    fleet.traffic(0.0)
    settle_writes(fleet.sim, client, fleet.slots, 30.0)


def test_every_subscription_is_owned_exactly_once_and_no_slot_flaps(
    fleet: Fleet, client: redis.Redis
) -> None:
    """3 members, 60 subscriptions: one owner each, one open holder per slot, no flapping."""
    owners = fleet.owners()
    assert all(owners[n] for n in NAMES), f"a member owns nothing: {owners}"
    steady(fleet)
    assert fleet.owned_once()
    extra = {k: n for k, n in fleet.open_per_slot().items() if n != 1}
    assert not extra, f"slots with other than one open connection: {extra}"
    finish(fleet, client)
    result = compare(fleet.sim, client, fleet.slots)
    assert result.delivered > 0
    assert result.duplicated_total == 0
    assert result.lost_total == 0
    assert result.dropped == 0


def test_rolling_restart_of_every_member_loses_and_duplicates_nothing(
    fleet: Fleet, client: redis.Redis
) -> None:
    """SIGTERM, exit 0, start, ready, for each member in turn: 0 lost, 0 duplicated."""
    for name in NAMES:
        assert fleet.stop(name) == 0, fleet.tail(name)
        poll(fleet.settled, SETTLE, f"the others own everything after {name} stopped")
        fleet.start(name)
        fleet.wait_ready(name)
        poll(functools.partial(settled_with, fleet, name), SETTLE, f"{name} back with a share")
    steady(fleet)
    finish(fleet, client)
    result = compare(fleet.sim, client, fleet.slots)
    assert result.duplicated_total == 0, result.duplicated
    assert result.lost_total == 0, result.lost
    assert result.dropped == 0, "frames generated while no connection held their slot"
    assert not [g for g in gap_records(client) if g.get("cause") == "failover"]


def holders(fleet: Fleet) -> dict[tuple[str, str], int | None]:
    """The simulator's holder connection per slot."""
    return {k: v.get("holder") for k, v in fleet.slot_stats().items()}


def taken_over(fleet: Fleet, gone: str, keys: set[str]) -> bool:
    """Every key of `gone` is owned by one of the others, and every slot is held."""
    owners = fleet.owners(skip={gone})
    owned = [k for n, ks in owners.items() for k in ks]
    return keys <= set(owned) and len(owned) == len(set(owned)) and fleet.all_held()


def test_kill_9_of_a_member_is_taken_over_within_the_lease_with_failover_gaps(
    fleet: Fleet, client: redis.Redis
) -> None:
    """kill -9: its subscriptions are back within lease_ttl + 5 s, each with a `failover` gap
    record; restarted, it replays its spool with no duplicate (the high-water mark)."""
    victim = "m1"
    keys = fleet.members[victim].owned()
    assert keys
    started = time.monotonic()
    fleet.kill(victim)
    poll(lambda: taken_over(fleet, victim, keys), LEASE_TTL + 5.0, "the takeover")
    took = time.monotonic() - started

    def failovers() -> dict[str, dict[str, Any]]:
        records = gap_records(client)
        return {f"{g['source']}/{g['event']}": g for g in records if g["cause"] == "failover"}

    try:  # the gap records are written by the new owners' writers, right after they connect
        poll(lambda: keys <= set(failovers()), 10.0, "the failover gap records")
    except AssertionError:
        raise AssertionError(f"no failover gap for {sorted(keys - set(failovers()))}") from None
    gaps = failovers()
    for key in keys:
        gap = gaps[key]
        assert int(gap["start"]) <= int(gap["end"])
        assert victim in gap["detail"]
    fleet.start(victim)
    fleet.wait_ready(victim)
    back = fleet.members[victim]
    poll(lambda: fleet.settled() and back.owned(), SETTLE, "settled, the victim back")
    steady(fleet)
    finish(fleet, client)
    result = compare(fleet.sim, client, fleet.slots)
    assert result.duplicated_total == 0, result.duplicated
    lost_keys = {f"{s}/{e}" for s, e in result.lost}
    assert lost_keys <= keys, f"frames lost outside the failover: {sorted(lost_keys - keys)}"
    print(f"takeover after {took:.1f}s; lost {result.lost_total} (in the killed member's kernel)")


def test_a_fourth_member_takes_a_share_without_losing_anything(
    fleet: Fleet, client: redis.Redis
) -> None:
    """A 4th member joins: it gets a share by planned handover, every member owns some,
    0 lost, 0 duplicated, no frame generated while its slot had no holder."""
    fleet.start("m4")
    fleet.wait_ready("m4")
    poll(
        lambda: fleet.settled() and all(fleet.owners().values()) and len(fleet.owners()) == 4,
        SETTLE,
        "the 4th member with a share",
    )
    steady(fleet)
    loads = {n: len(ks) for n, ks in fleet.owners().items()}
    assert all(loads.values()), loads
    assert sum(loads.values()) == len(fleet.slots), loads
    finish(fleet, client)
    result = compare(fleet.sim, client, fleet.slots)
    assert result.duplicated_total == 0, result.duplicated
    assert result.lost_total == 0, result.lost
    assert result.dropped == 0


def test_a_member_paused_beyond_its_lease_does_not_steal_back(
    fleet: Fleet, client: redis.Redis
) -> None:
    """SIGSTOP longer than lease_ttl, then SIGCONT: the new owners keep their connections
    (the simulator's holders do not change for what they own), no subscription flaps."""
    victim = "m2"
    keys = fleet.members[victim].owned()
    assert keys
    fleet.pause(victim)
    try:
        poll(lambda: taken_over(fleet, victim, keys), LEASE_TTL + 10.0, "the takeover")
        before = holders(fleet)
        others = fleet.owners(skip={victim})
    finally:
        fleet.resume(victim)
    paused = fleet.members[victim]
    poll(lambda: paused.get("/status")[0] == 200, 20.0, "the paused member answering")
    # Its own clock said every lease had passed its deadline: it holds nothing it had.
    assert not (paused.owned() & keys) or fleet.owned_once()
    # It gets its share back, by planned handover only.
    poll(lambda: fleet.settled() and paused.owned(), SETTLE, "settled, the paused one back")
    steady(fleet)
    after = holders(fleet)
    now_owned = fleet.owners()
    for name, owned in others.items():
        for key in owned:
            source, event = key.split("/", 1)
            slot = (source, event)
            if key in now_owned.get(name, set()):  # still theirs: the same connection
                assert after[slot] == before[slot], f"{key} was taken from {name}"
            else:  # moved since: only by planned handover, to the member that owns it now
                assert key in now_owned[victim], f"{key} left {name} for nobody"
    finish(fleet, client)
    result = compare(fleet.sim, client, fleet.slots)
    assert result.duplicated_total == 0, result.duplicated
    lost_keys = {f"{s}/{e}" for s, e in result.lost}
    assert lost_keys <= keys, f"frames lost outside the takeover: {sorted(lost_keys - keys)}"


def test_redis_restarted_leaves_no_subscription_with_two_owners(
    fleet: Fleet, fleet_redis: RedisServer
) -> None:
    """Redis killed and restarted empty (no persistence): after the quiet period every
    subscription has one owner and no slot flaps."""
    fleet_redis.stop()
    fleet_redis.start()
    poll(fleet.settled, SETTLE, "settled after the Redis restart")
    steady(fleet, 3 * LEASE_TTL)
    assert fleet.owned_once()
    statuses = [m.fleet() for m in fleet.members.values()]
    assert all(s.get("redis_ok") for s in statuses), statuses


def fleet_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    config = fleet.members["m1"].config
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "fleet", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_forwarder_fleet_drain_hands_a_member_s_share_over_and_cancel_brings_it_back(
    fleet: Fleet, client: redis.Redis
) -> None:
    """`forwarder fleet drain --member m1 --wait`: m1 hands everything over (successors
    first) and stays up owning nothing; `--cancel`: it takes its share back; 0 lost."""
    drained = fleet_cli(fleet, "drain", "--member", "m1", "--wait", "30")
    assert drained.returncode == 0, drained.stderr
    assert fleet.members["m1"].alive
    assert fleet.members["m1"].fleet()["draining"] == "drain"
    poll(lambda: fleet.settled() and not fleet.members["m1"].owned(), SETTLE, "m1 drained")
    cancelled = fleet_cli(fleet, "drain", "--member", "m1", "--cancel")
    assert cancelled.returncode == 0, cancelled.stderr
    poll(functools.partial(settled_with, fleet, "m1"), SETTLE, "m1 back with a share")
    steady(fleet)
    finish(fleet, client)
    result = compare(fleet.sim, client, fleet.slots)
    assert result.duplicated_total == 0, result.duplicated
    assert result.lost_total == 0, result.lost
    assert result.dropped == 0


def test_redis_unreachable_members_keep_until_the_deadline_then_stop_and_resume(
    fleet: Fleet, fleet_redis: RedisServer, client: redis.Redis
) -> None:
    """Redis paused (SIGSTOP) beyond the leases: nothing stops at the first failed round;
    every subscription stops by its lease's deadline (/readyz 503 says why); once Redis is
    back they are acquired again, each once, each with a gap record; no duplicate."""
    assert fleet_redis.proc is not None
    fleet_redis.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        poll(lambda: not fleet.all_held(), LEASE_TTL + 10.0, "a subscription to stop")
        first_stop = time.monotonic() - paused_at
        poll(
            lambda: not any(v.get("holder_open") for v in fleet.slot_stats().values()),
            LEASE_TTL + 10.0,
            "every subscription stopped",
        )
        code, body = fleet.members["m1"].get("/readyz")
    finally:
        fleet_redis.signal(signal.SIGCONT)
    # The earliest deadline is lease_ttl - margin - renew_interval after the pause (1.4 s).
    assert first_stop >= 1.0, f"stopped {first_stop:.1f}s after Redis went away"
    assert code == 503
    assert "no Redis round trip" in str(body.get("fleet_reason")), body
    # The first member to reach Redis again may find the others' records expired and take
    # everything; the others' next heartbeats bring their shares back by handover.
    poll(
        lambda: fleet.settled() and all(fleet.owners().values()),
        SETTLE,
        "settled after Redis came back, every member with a share",
    )
    steady(fleet)
    finish(fleet, client)
    # Each gap closes when its subscription is back: `failover` if its lease had run out in
    # Redis, `deadline` if the member stopped it and then found its own lease still there.
    causes = ("failover", "deadline")
    gaps = {(g["source"], g["event"]) for g in gap_records(client) if g["cause"] in causes}
    assert set(fleet.slots) <= gaps
    result = compare(fleet.sim, client, fleet.slots)
    assert result.duplicated_total == 0, result.duplicated

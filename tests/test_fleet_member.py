"""FleetMember's rules with a fake clock and a model of the store (no sockets, no Redis).

Members run their rounds in turn on one fake clock; an `Obedient` daemon per member applies
the directives to a model of the upstream's slots (newest connection wins). After every
round the world checks the promises: no subscription has two lease holders, and no member
ever connects to a subscription it may not run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from forwarder.errors import FleetError
from forwarder.fleet.assignment import owner
from forwarder.fleet.directives import Acquired, ConnectAsSuccessor, Resubscribe, StopNow
from forwarder.fleet.keys import sub_id
from forwarder.fleet.member import FleetMember
from forwarder.fleet.runner import FleetThread
from tests.fleet_harness import CONFIG, Obedient, World, alone, keys, owners
from tests.fleet_model import ModelStore


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    w.candidates = keys(60)
    yield w
    assert not w.double, f"two lease holders at once: {w.double[:3]}"


def all_owned_once(world: World) -> bool:
    got = owners(list(world.members.values()))
    return all(len(got.get(k, [])) == 1 for k in world.candidates)


def test_a_lone_member_acquires_everything_after_the_quiet_period(world: World) -> None:
    """A fresh epoch holds acquisitions back one lease_ttl, then the member takes all."""
    a = world.add("a")
    world.step(0.0)
    assert not a.owned()  # quiet: Redis might just have lost a holder's leases
    world.step(CONFIG.lease_ttl)
    assert a.owned() == frozenset(world.candidates)
    assert {world.upstream.feed(k) for k in world.candidates} == {"a"}
    assert a.health() == (True, None)


def test_two_members_split_the_subscriptions_by_rendezvous(world: World) -> None:
    """Every subscription ends up owned once, by the member the assignment names."""
    world.add("a")
    world.add("b")
    world.settle()
    assert all_owned_once(world)
    for key in world.candidates:
        assert world.owner_of(key) == [owner(key, ["a", "b"])]
        assert world.upstream.feed(key) == world.owner_of(key)[0]


def test_join_moves_subscriptions_with_the_successor_connected_first(world: World) -> None:
    """A joining member gets its share by handover: never a moment without a feed."""
    a = alone(world)
    world.blind.clear()
    b = world.add("b")
    world.daemons["b"].slow_successors = True  # a's close must wait for b's handshake
    world.settle()
    assert all_owned_once(world)
    expected = {k for k in world.candidates if owner(k, ["a", "b"]) == "b"}
    assert b.owned() == frozenset(expected)
    assert expected
    assert world.blind == {}, "a key was without a feed during the handover"
    assert a.stats.handovers["rebalance"] == len(expected)
    # The successor connected before the holder closed: b's connect precedes a's release.
    for key in expected:
        assert world.upstream.feed(key) == "b"
    assert b.stats.acquisitions["handover"] == len(expected)


def test_drain_hands_everything_over_and_takes_nothing_new(world: World) -> None:
    """`drain` moves every owned subscription to the others with no gap; then drained()."""
    a = world.add("a")
    world.add("b")
    world.settle()
    world.blind.clear()
    a.drain("shutdown")
    world.settle(4)
    assert a.owned() == frozenset()
    assert a.drained()
    assert world.members["b"].owned() == frozenset(world.candidates)
    assert world.blind == {}
    assert a.stats.handovers["shutdown"] > 0
    world.threads["a"].leave()
    world.paused.add("a")  # the process exits
    world.settle(2)
    assert "a" not in {m["name"] for m in world.members["b"].status()["members"]}


def test_holder_death_fails_over_within_the_ttl_with_a_gap_record(world: World) -> None:
    """kill -9 of a member: its subscriptions are taken over once its leases run out, and
    the takeover names the dead member's last heartbeat as the start of the gap."""
    world.add("a")
    b = world.add("b")
    world.settle()
    a_keys = world.members["a"].owned()
    assert a_keys
    last_beat = world.redis.registry["a"] / 1000.0
    world.paused.add("a")
    world.daemons["a"].die()
    died_at = world.clock.monotonic()
    while not a_keys <= b.owned():
        world.step(0.5)
        assert world.clock.monotonic() - died_at <= CONFIG.lease_ttl + CONFIG.renew_interval + 1
    for key in a_keys:
        takeover = world.daemons["b"].takeovers[key]
        assert takeover is not None
        assert takeover.cause == "failover"
        assert takeover.previous == "a"
        assert takeover.since == pytest.approx(last_beat, abs=0.001)
        assert world.upstream.feed(key) == "b"
    assert b.stats.acquisitions["failover"] == len(a_keys)


def test_a_failover_gap_starts_before_a_restarted_namesake_beat(world: World) -> None:
    """kill -9, then a new process under the same name at once: the heartbeats are kept by
    name, so the gap must not start at the new process's beats but before the death."""
    world.add("a")
    world.add("b")
    world.settle()
    a_keys = world.members["a"].owned()
    assert a_keys
    last_beat = world.redis.registry["a"] / 1000.0
    world.daemons["a"].die()
    again = FleetMember(CONFIG, world.clock, name="a", incarnation="a-2")
    again.set_candidates(world.candidates)
    world.members["a"] = again
    world.stores["a"] = ModelStore(world.redis, CONFIG)
    world.threads["a"] = FleetThread(again, world.stores["a"])
    world.daemons["a"] = Obedient(again, world.upstream)
    for _ in range(40):
        world.step(0.5)
        if all(world.owner_of(k) for k in a_keys):
            break
    takeovers = {**world.daemons["a"].takeovers, **world.daemons["b"].takeovers}
    assert a_keys <= set(takeovers)
    for key in a_keys:
        takeover = takeovers[key]
        assert takeover is not None
        assert takeover.cause == "failover"
        assert takeover.since <= last_beat + 0.001
        assert takeover.since >= last_beat - CONFIG.renew_interval - 0.001


def test_a_paused_member_stops_by_its_own_clock_and_does_not_steal_back(world: World) -> None:
    """SIGSTOP longer than the ttl: after SIGCONT the member gives everything up before any
    round trip, never reconnects what it lost, and only gets work back by handover."""
    a = world.add("a")
    b = world.add("b")
    world.settle()
    a_keys = a.owned()
    world.paused.add("a")  # SIGSTOP: a's connections stay open, it just does nothing
    world.step(CONFIG.lease_ttl + 1.0)
    world.settle(3)
    assert a_keys <= b.owned()  # b took over once a's leases ran out
    # SIGCONT: before a's fleet thread runs, the I/O threads ask may_connect.
    assert not any(a.may_connect(k) for k in a_keys)
    world.paused.discard("a")
    connects_before = len(world.upstream.connects)
    world.round("a")
    stops = [(k, r) for k, r in world.daemons["a"].stops if k in a_keys]
    assert {k for k, _ in stops} == a_keys
    assert {r for _, r in stops} == {"deadline"}
    assert world.upstream.connects[connects_before:] == []  # no connect from a
    assert a.stats.lease_losses["deadline"] == len(a_keys)
    world.settle()
    # Back in the group, a gets its share again, but only as a successor (connect first).
    moved_back = [d.key for d in world.daemons["a"].seen if isinstance(d, ConnectAsSuccessor)]
    acquired = [d.key for d in world.daemons["a"].seen if isinstance(d, Acquired)]
    assert set(acquired) & a_keys <= set(a_keys) - b.owned()
    assert moved_back
    assert all_owned_once(world)


def test_a_renewal_counts_from_when_it_was_sent(world: World) -> None:
    """A reply that arrives late (the process was paused while it was in flight) cannot
    extend a lease past sent + ttl - margin: that is when Redis may let it expire."""
    a = alone(world)
    request = a.heartbeat_request()
    sent = world.clock.monotonic()
    reply = world.stores["a"].heartbeat(request)
    world.clock.advance(CONFIG.lease_ttl - CONFIG.margin + 0.5)  # paused with the reply
    a.heartbeat_done(reply)
    assert a.deadline(world.candidates[0]) == sent + CONFIG.lease_ttl - CONFIG.margin
    assert not a.may_connect(world.candidates[0])
    a.tick()
    assert a.owned() == frozenset()
    assert {d.reason for d in a.take_directives() if isinstance(d, StopNow)} == {"deadline"}


def test_redis_unreachable_keeps_leases_until_their_deadline_then_stops(world: World) -> None:
    """Redis down: nothing is dropped at the first failure; each lease stops at its local
    deadline (sent + ttl - margin); when Redis is back, normal acquisition resumes."""
    a = alone(world)
    last_renewal = world.clock.monotonic()
    world.redis.down = True
    world.step(1.0)
    assert a.owned() == frozenset(world.candidates)  # kept while the lease is surely ours
    assert not a.health()[0]
    assert "no Redis round trip" in str(a.health()[1])
    deadline = last_renewal + CONFIG.lease_ttl - CONFIG.margin
    while world.clock.monotonic() < deadline - 0.5:
        world.step(0.5)
        assert a.owned() == frozenset(world.candidates)
    world.step(1.0)
    assert a.owned() == frozenset()
    assert {r for _, r in world.daemons["a"].stops} == {"deadline"}
    world.redis.down = False
    world.settle(3)
    assert a.owned() == frozenset(world.candidates)
    assert a.health() == (True, None)


def test_a_short_outage_loses_nothing(world: World) -> None:
    """Redis unreachable for less than ttl - margin - renew_interval: no lease is lost."""
    a = alone(world)
    world.redis.down = True
    world.step(2.0)
    assert a.owned() == frozenset(world.candidates)
    world.redis.down = False
    world.step(2.0)
    assert a.owned() == frozenset(world.candidates)
    assert world.daemons["a"].stops == []
    assert {world.upstream.feed(k) for k in world.candidates} == {"a"}


def test_redis_restart_holders_reassert_and_newcomers_wait(world: World) -> None:
    """Redis forgets everything: the first member to come back sees only itself, yet it
    acquires nothing held elsewhere; holders re-assert their leases at their next renewal."""
    a = world.add("a")
    b = world.add("b")
    world.settle()
    before = {"a": a.owned(), "b": b.owned()}
    world.redis.flush()
    world.round("a")  # a alone in the registry: the assignment gives it everything
    assert a.owned() == before["a"]
    world.round("b")
    assert b.owned() == before["b"]
    world.settle()
    assert a.owned() == before["a"]
    assert b.owned() == before["b"]
    assert a.stats.reasserted == len(before["a"])
    assert a.stats.epoch_changes == 1
    assert world.daemons["a"].stops == []
    assert world.daemons["b"].stops == []


def test_a_lost_acquire_reply_is_adopted_next_round(world: World) -> None:
    """Acquisitions applied in Redis whose reply was lost are recognised as ours next round,
    without burning a fencing number."""
    a = world.add("a")
    world.step(0.0)
    world.clock.advance(CONFIG.lease_ttl)
    world.stores["a"].lose_next.add("change")
    world.round("a")
    assert a.owned() == frozenset()
    assert all(str(world.redis.holder(k)).startswith("1 a ") for k in world.candidates)
    world.step()
    assert a.owned() == frozenset(world.candidates)
    assert {world.redis.holder(k) for k in world.candidates} == {"1 a a-1"}
    assert {world.upstream.feed(k) for k in world.candidates} == {"a"}


def test_a_successor_that_never_connects_is_called_off(world: World) -> None:
    """The move times out; the holder keeps the feed and re-subscribes to be sure."""
    a = alone(world)
    b = world.add("b")
    world.daemons["b"].connect_successors = False
    world.settle(int(CONFIG.handover_timeout / (10 / 3)) + 3)
    assert a.stats.handovers_aborted > 0
    assert a.owned() == frozenset(world.candidates)  # nothing moved
    assert {r for _, r in world.daemons["b"].stops} == {"aborted"}
    assert any(
        r.reason == "handover_aborted"
        for r in world.daemons["a"].seen
        if isinstance(r, Resubscribe)
    )
    assert all(world.upstream.feed(k) == "a" for k in world.candidates)
    assert not b.owned()


def test_a_handover_reply_lost_after_release_still_counts_once(world: World) -> None:
    """The release that handed a lease over is applied but its reply lost: the holder learns
    from its next renewal that the successor holds it, and counts one handover, no loss."""
    world.candidates = keys(1)
    key = world.candidates[0]
    a = alone(world)
    target = next(t for t in (f"m{i}" for i in range(100)) if owner(key, ["a", t]) == t)
    world.add(target)
    world.daemons["a"].report_closed = False  # released after CLOSE_GRACE instead
    for _ in range(40):
        if a.status()["leases"][0]["closing"]:
            break
        world.step(0.25)
    assert a.status()["leases"][0]["closing"]  # told to close: the successor is connected
    world.stores["a"].lose_next.add("change")  # the release (a change) loses its reply
    world.settle(30, seconds=0.25)
    assert world.members[target].owned() == frozenset(world.candidates)
    assert a.owned() == frozenset()
    assert a.stats.handovers["rebalance"] == 1
    assert a.stats.lease_losses["lost"] == 0
    assert world.upstream.feed(key) == target
    assert world.blind == {}


def test_a_removed_candidate_is_stopped_and_released(world: World) -> None:
    """A subscription no longer among the candidates is stopped and its lease freed."""
    a = alone(world)
    gone = world.candidates[0]
    a.set_candidates(world.candidates[1:])
    world.step()
    assert (gone, "removed") in world.daemons["a"].stops
    world.step()
    assert gone not in a.owned()
    assert world.redis.holder(gone) is None


def test_a_second_process_with_the_same_name_is_refused(world: World) -> None:
    """Two live processes named alike: the second is not ready and takes nothing."""
    world.add("a")
    world.settle(2)
    twin = FleetMember(CONFIG, world.clock, name="a", incarnation="a-2")
    twin.set_candidates(world.candidates)
    thread = FleetThread(twin, ModelStore(world.redis, CONFIG))
    for _ in range(5):
        world.clock.advance(10 / 3)
        thread.run_round()
        world.round("a")
    ok, reason = twin.health()
    assert not ok
    assert "in use by another live process" in str(reason)
    assert twin.owned() == frozenset()


def test_members_given_different_candidates_show_as_disagreeing(world: World) -> None:
    """A member with another subscription list is counted in forwarder_fleet_disagreeing."""
    a = world.add("a")
    world.add("b", candidates=world.candidates[:-1])
    world.settle(2)
    assert a.stats.disagreeing == 1
    assert [m["same_candidates"] for m in a.status()["members"]] == [True, False]


def test_may_connect_refuses_a_handshake_that_could_outlive_the_lease(world: World) -> None:
    """`within`: a connection that might still be opening at the deadline is not started."""
    a = alone(world)
    key = world.candidates[0]
    deadline = a.deadline(key)
    assert deadline is not None
    left = deadline - world.clock.monotonic()
    assert a.may_connect(key, within=left - 0.1)
    assert not a.may_connect(key, within=left + 0.1)
    assert not a.may_connect(("other", "event"))


def test_a_failed_round_is_reported_with_its_kind(world: World) -> None:
    """Round-trip failures are counted by kind and shown in status()."""
    a = world.add("a")
    world.redis.down = True
    world.step()
    assert a.stats.round_failures["connection"] == 1
    assert a.status()["redis_ok"] is False
    assert "Redis is down" in str(a.status()["last_error"])
    assert isinstance(FleetError("x", "y"), Exception)


def test_status_lists_members_and_what_this_member_holds(world: World) -> None:
    """status(): members with their counts, our leases with fence and deadline."""
    a = world.add("a")
    world.add("b")
    world.settle()
    status = a.status()
    assert [m["name"] for m in status["members"]] == ["a", "b"]
    assert status["owned"] == len(a.owned())
    lease = status["leases"][0]
    assert lease["role"] == "owner"
    assert lease["fence"] >= 1
    assert 0 < lease["deadline_in_seconds"] <= CONFIG.lease_ttl - CONFIG.margin
    assert {lease["subscription"] for lease in status["leases"]} == {sub_id(k) for k in a.owned()}


def test_stop_now_names_the_reason_when_the_lease_is_taken(world: World) -> None:
    """A lease found in someone else's hands is given up at once with reason 'lost'."""
    a = alone(world)
    key = world.candidates[0]
    world.redis.leases[sub_id(key)].value = "99 intruder x"
    world.step()
    assert (key, "lost") in world.daemons["a"].stops
    assert key not in a.owned()
    assert any(isinstance(d, StopNow) and d.key == key for d in world.daemons["a"].seen)

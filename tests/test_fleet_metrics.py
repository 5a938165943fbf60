"""FleetCollector: the fleet's Prometheus families, with every label value from the start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.fleet.metrics import FleetCollector
from forwarder.fleet.stats import ACQUISITION_KINDS, HANDOVER_REASONS, LOSS_REASONS
from tests.fleet_harness import CONFIG, World, alone, keys


def scrape(world: World, name: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(FleetCollector(world.members[name]))
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_a_fresh_member_exports_zeroes_for_every_label() -> None:
    """Before anything happened, each counter already has all its label values at 0."""
    world = World()
    world.add("a", keys(3))
    got = scrape(world, "a")
    assert got["forwarder_owned_subscriptions"] == {(): 0}
    assert got["forwarder_fleet_subscriptions"] == {(): 3}
    assert set(got["forwarder_handovers_total"]) == {(("reason", r),) for r in HANDOVER_REASONS}
    assert set(got["forwarder_lease_losses_total"]) == {(("reason", r),) for r in LOSS_REASONS}
    assert set(got["forwarder_lease_acquisitions_total"]) == {
        (("kind", k),) for k in ACQUISITION_KINDS
    }
    assert got["forwarder_fleet_member_info"] == {(("group", "default"), ("member", "a")): 1}


def test_the_numbers_follow_what_the_members_did() -> None:
    """Members, owned leases, handovers and losses are counted as they happen."""
    world = World()
    world.candidates = keys(20)
    a = alone(world)
    world.add("b")
    world.settle()
    got = scrape(world, "a")
    assert got["forwarder_fleet_members"] == {(): 2}
    assert got["forwarder_fleet_eligible_members"] == {(): 2}
    assert got["forwarder_owned_subscriptions"] == {(): len(a.owned())}
    moved = 20 - len(a.owned())
    assert got["forwarder_handovers_total"][(("reason", "rebalance"),)] == moved
    assert (
        scrape(world, "b")["forwarder_lease_acquisitions_total"][(("kind", "handover"),)] == moved
    )
    assert got["forwarder_fleet_redis_ok"] == {(): 1}
    held = len(a.owned())
    world.redis.down = True
    world.step(CONFIG.lease_ttl)  # one round, after every deadline
    got = scrape(world, "a")
    assert got["forwarder_lease_losses_total"][(("reason", "deadline"),)] == held
    assert got["forwarder_owned_subscriptions"] == {(): 0}
    assert got["forwarder_fleet_redis_ok"] == {(): 0}
    assert got["forwarder_fleet_round_failures_total"] == {(("kind", "connection"),): 1}

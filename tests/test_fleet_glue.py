"""forwarder/fleet_glue.py in one in-process daemon: a real redis-server, the simulator.

The test thread plays the daemon's main loop (`fleet.turn()`), as `Forwarder.run` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from forwarder import fleet_glue
from forwarder.daemon import Forwarder
from forwarder.fleet.protocol import HeartbeatReply, HeartbeatRequest
from forwarder.fleet.store import RedisFleetStore
from forwarder.stats import State
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import wait_for

EVENTS = ["messages.upsert", "chats.upsert"]
LEASE_TTL = 3.0
FLEET = f"""
[fleet]
enabled = true
name = "solo"
lease_ttl = {LEASE_TTL}
renew_interval = 1.0
margin = 0.6
"""
SOURCE = """
connect_timeout = 1.0
backoff = { initial = 0.05, maximum = 0.5 }
"""


class HangingStore(RedisFleetStore):
    """The real store, whose heartbeat can be made to hang (a fleet thread stuck in a call
    that never returns: the one thing the loop's own deadline timer is there for)."""

    hang = threading.Event()
    release = threading.Event()

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatReply:
        if self.hang.is_set():
            self.release.wait(60.0)
        return super().heartbeat(request)


@pytest.fixture
def hanging(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HangingStore]]:
    HangingStore.hang.clear()
    HangingStore.release.clear()
    monkeypatch.setattr(fleet_glue, "RedisFleetStore", HangingStore)
    yield HangingStore
    HangingStore.release.set()


def drive(forwarder: Forwarder, predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Be the main loop (apply directives) until `predicate()` holds."""
    glue = forwarder.fleet
    assert glue is not None

    def turned() -> object:
        glue.turn()
        return predicate()

    wait_for(turned, timeout, what)


def connected(forwarder: Forwarder) -> bool:
    states = [forwarder.stats[i].state for i in range(len(forwarder.stats))]
    return len(forwarder.subscribers) == len(EVENTS) and all(s is State.CONNECTED for s in states)


def started(
    make_config: ConfigFactory, run_forwarder: Callable[..., Forwarder], redis_client: redis.Redis
) -> Forwarder:
    config = make_config({"main": EVENTS}, extra_source=SOURCE, extra=FLEET)
    forwarder = run_forwarder(config)
    # The first acquisitions of a group on a fresh Redis wait one lease_ttl (quiet period).
    drive(forwarder, lambda: connected(forwarder), 20.0, "both subscriptions connected")
    return forwarder


def test_a_stuck_fleet_thread_cannot_keep_a_subscription_past_its_lease_deadline(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    redis_client: redis.Redis,
    simulator: Simulator,
    hanging: type[HangingStore],
) -> None:
    """The fleet thread hangs in a Redis call: each subscription still stops by its lease's
    local deadline, on its I/O loop's clock, and never reconnects."""
    forwarder = started(make_config, run_forwarder, redis_client)
    glue = forwarder.fleet
    assert glue is not None
    hanging.hang.set()
    stuck_at = time.monotonic()
    keys = [("main", e) for e in EVENTS]
    last = max(d for d in (glue.member.deadline(k) for k in keys) if d is not None)
    wait_for(lambda: all(r.finished for r in forwarder.subscribers), LEASE_TTL + 2.0, "stopped")
    stopped_at = time.monotonic()
    assert stopped_at >= last - 0.05, "stopped before the deadline"
    assert stopped_at - stuck_at <= LEASE_TTL  # at its deadline: lease_ttl - margin at most
    slots = simulator.stats()["slots"]["main"]
    assert not any(slots[e]["holder_open"] for e in EVENTS), "a connection is still open"
    before = {e: slots[e]["connections"] for e in EVENTS}
    threading.Event().wait(0.5)  # nothing to wait for: proving that nothing happens
    after = simulator.stats()["slots"]["main"]
    assert {e: after[e]["connections"] for e in EVENTS} == before, "it reconnected"
    hanging.release.set()


def test_status_readyz_and_metrics_show_the_fleet(
    make_config: ConfigFactory, run_forwarder: Callable[..., Forwarder], redis_client: redis.Redis
) -> None:
    """/status has the member's view and a fleet_role per subscription, /readyz says the
    fleet is fine, /metrics counts what this member owns."""
    forwarder = started(make_config, run_forwarder, redis_client)
    code, doc = forwarder.status()
    assert code == 200
    fleet: dict[str, Any] = doc["fleet"]
    assert (fleet["name"], fleet["owned"], fleet["joined"]) == ("solo", 2, True)
    assert {row["fleet_role"] for row in doc["subscriptions"]} == {"owner"}
    ok, info = forwarder.ready()
    assert ok, info
    assert (info["fleet_ok"], info["fleet_reason"]) == (True, None)
    text = forwarder.registry.get_sample_value("forwarder_owned_subscriptions")
    assert text == 2.0


def test_a_member_whose_name_is_taken_is_not_ready_and_runs_nothing(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """A second process with the same [fleet] name: /readyz fails naming the first one's
    host and pid, and it runs no subscription."""
    first = started(make_config, run_forwarder, redis_client)
    config = make_config({"main": EVENTS}, extra_source=SOURCE, extra=FLEET)
    config = replace(config, spool=replace(config.spool, dir=tmp_path / "second"))
    second = run_forwarder(config)
    glue = second.fleet
    assert glue is not None

    def refused() -> bool:
        ok, info = second.ready()
        return not ok and "is in use by another live process" in str(info["fleet_reason"])

    drive(second, refused, 10.0, "the name conflict in /readyz")
    assert not second.subscribers
    assert connected(first)

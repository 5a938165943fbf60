"""The fleet in small (scenario G for correctness): 50 sources x 13 events in one process,
through the simulator and a real Redis. Timing goals are in the benchmark, not here."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import redis

from forwarder.config import IOConfig, Secret, SourceConfig, TokenRef
from forwarder.daemon import Forwarder
from forwarder.engine import TOKEN_CACHE_SECONDS, TokenExpiries, default_loops
from forwarder.events import SENT_EVENTS
from forwarder.stats import State
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET, ConfigFactory
from tests.helpers import wait_for

SOURCES = 50


@pytest.mark.slow
def test_650_subscriptions_exactly_once_through_a_few_threads_and_back_after_a_drop(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """50 x 13 subscriptions connect through 2 loops and the handshake pool (no thread per
    subscription); traffic on every one lands exactly once and in order; after every
    connection is dropped at once, all come back and traffic lands again."""
    events = list(SENT_EVENTS)
    sources = {f"i{n:02d}": events for n in range(SOURCES)}
    threads_before = threading.active_count()
    forwarder = run_forwarder(
        make_config(sources, extra="[io]\nloops = 2\nhandshake_threads = 8\n")
    )
    total = SOURCES * len(events)
    assert len(forwarder.subscribers) == total

    def all_connected() -> bool:
        return all(s.state is State.CONNECTED for s in forwarder.stats)

    wait_for(all_connected, 60.0, "650 subscriptions connected")
    # 2 loops + 8 handshake workers + writer, fsync, http: nothing per subscription.
    assert threading.active_count() - threads_before < 20
    rounds = [(instance, event) for instance in sources for event in events]
    for instance, event in rounds:
        simulator.send(instance, event, 3)
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == 3 * total, 60.0, "round one")
    dropped = simulator.drop()
    assert dropped == total
    wait_for(
        lambda: all_connected() and all(s.reconnects == 1 for s in forwarder.stats),
        60.0,
        "all back after the drop",
    )
    for instance, event in rounds:
        simulator.send(instance, event, 2)
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == 5 * total, 60.0, "round two")
    pipe = redis_client.pipeline(transaction=False)
    for instance, event in rounds:
        pipe.xrange(f"{instance}:{event}")
    for (instance, event), entries in zip(rounds, pipe.execute(), strict=True):
        got = [fields[b"data"] for _, fields in entries]
        assert got == simulator.delivered_frames(instance, event), (instance, event)
    assert sum(s.gaps_recorded for s in forwarder.stats) == total  # one per drop


def test_token_expiries_are_read_once_per_source_within_the_cache_time() -> None:
    """13 subscriptions of a source ask for the token's exp: the source is read once, again
    after TOKEN_CACHE_SECONDS."""
    now = [0.0]
    reads: list[str] = []

    class CountingToken(TokenRef):
        def read(self) -> Secret:
            reads.append(self.origin)
            return Secret(mint_token("main", SECRET, expires_in=60, now=1_800_000_000))

    src = SourceConfig(name="main", url="ws://h/ws/events", token=CountingToken(origin="t"))
    cache = TokenExpiries(lambda: now[0])
    readers = [cache.reader(src) for _ in range(13)]
    assert {r() for r in readers} == {1_800_000_060.0}
    assert len(reads) == 1
    now[0] = TOKEN_CACHE_SECONDS
    readers[0]()
    assert len(reads) == 2


def test_one_loop_per_core_by_default_and_at_most_four() -> None:
    """One loop by default; [io] loops = 0 means one per CPU core, capped at 4."""
    assert 1 <= default_loops() <= 4
    assert IOConfig().loops == 1

"""The consumer-group monitor: metrics against known group states, rounds, skips, readiness."""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import ConsumersConfig
from forwarder.consumers import (
    ConsumerCollector,
    StreamMonitor,
    UnreadTrimTracker,
    round_seconds,
    writer_busy,
)
from forwarder.daemon import Forwarder
from forwarder.retention import Retention
from forwarder.stats import WriterStats
from forwarder.streaminfo import GroupFacts, LagKind, StreamFacts, observe
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(monitor: StreamMonitor) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConsumerCollector(monitor))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def group_value(values: Samples, name: str, stream: str, group: str) -> float:
    return values[(name, (("group", group), ("stream", stream)))]


Reply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]  # XREADGROUP's


def fill(client: redis.Redis, stream: str, count: int) -> list[bytes]:
    """XADD `count` forwarder-shaped entries; their IDs."""
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(stream, {"data": json.dumps({"n": i}), "event": "e", "source": "s"})
    return [bytes(i) for i in pipe.execute()]


def read(client: redis.Redis, stream: str, group: str, count: int) -> list[bytes]:
    """Deliver `count` entries to consumer c1 of `group`; their IDs."""
    reply = cast(Reply, client.xreadgroup(group, "c1", {stream: ">"}, count=count))
    return [entry_id for _, entries in reply for entry_id, _ in entries]


def monitor_for(client: redis.Redis, *streams: str, **kwargs: object) -> StreamMonitor:
    return StreamMonitor(client, lambda: streams, ConsumersConfig(interval=1.0), **kwargs)  # type: ignore[arg-type]


# -- lag, pending, oldest pending age ----------------------------------------------------------


def test_metrics_match_known_group_states(redis_client: redis.Redis) -> None:
    """Length, lag, pending, consumers and oldest pending age are what the groups' states say."""
    ids = fill(redis_client, "orders", 100)
    redis_client.xgroup_create("orders", "fresh", id="0")  # never read: all 100 to deliver
    redis_client.xgroup_create("orders", "half", id="0")
    delivered = read(redis_client, "orders", "half", 40)
    redis_client.xack("orders", "half", *delivered[:30])  # 10 stay pending
    # The oldest pending entry was delivered two minutes ago (XCLAIM ... IDLE sets that).
    redis_client.xclaim("orders", "half", "c2", 0, [delivered[30]], idle=120_000)
    redis_client.xgroup_create("orders", "done", id="0")
    redis_client.xack("orders", "done", *read(redis_client, "orders", "done", 100))
    redis_client.xgroup_create("orders", "late", id="$")  # created after the entries
    monitor = monitor_for(redis_client, "orders", "absent")
    assert monitor.run_round()
    values = samples(monitor)
    assert values[("forwarder_stream_length", (("stream", "orders"),))] == 100
    assert values[("forwarder_stream_length", (("stream", "absent"),))] == 0
    lag = {
        g: group_value(values, "forwarder_consumer_group_lag", "orders", g)
        for g in ("fresh", "half", "done", "late")
    }
    assert lag == {"fresh": 100, "half": 60, "done": 0, "late": 0}
    pending = {
        g: group_value(values, "forwarder_consumer_group_pending", "orders", g)
        for g in ("fresh", "half", "done", "late")
    }
    assert pending == {"fresh": 0, "half": 10, "done": 0, "late": 0}
    assert group_value(values, "forwarder_consumer_group_consumers", "orders", "half") == 2
    age = group_value(
        values, "forwarder_consumer_group_oldest_pending_age_seconds", "orders", "half"
    )
    assert 120 <= age < 150
    assert (
        group_value(
            values, "forwarder_consumer_group_oldest_pending_age_seconds", "orders", "fresh"
        )
        == 0
    )
    assert ids  # the entries exist


def test_fan_in_streams_are_observed_once_per_stream(redis_client: redis.Redis) -> None:
    """Several subscriptions writing one stream: one series and one Redis call per stream."""
    fill(redis_client, "messages.upsert", 4)
    redis_client.xgroup_create("messages.upsert", "billing", id="0")
    # The daemon passes one stream name per route: here three sources share the stream.
    monitor = monitor_for(redis_client, "messages.upsert", "messages.upsert", "messages.upsert")
    redis_client.config_resetstat()
    assert monitor.run_round()
    assert redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] == 1  # one call, too
    values = samples(monitor)
    lengths = [k for k in values if k[0] == "forwarder_stream_length"]
    assert lengths == [("forwarder_stream_length", (("stream", "messages.upsert"),))]
    lags = [k for k in values if k[0] == "forwarder_consumer_group_lag"]
    assert len(lags) == 1
    assert values[lags[0]] == 4


def test_lag_is_computed_where_redis_reports_nil(redis_client: redis.Redis) -> None:
    """A group created at an ID inside the stream: Redis 7 says nil, the metric counts 70."""
    ids = fill(redis_client, "s", 100)
    redis_client.xgroup_create("s", "mid", id=ids[29].decode())
    redis_lag = {g["name"]: g["lag"] for g in redis_client.xinfo_groups("s")}
    assert redis_lag[b"mid"] is None  # the state this test is about
    facts = observe(redis_client, "s")
    assert facts.groups[0].lag == 70
    assert facts.groups[0].lag_kind is LagKind.EXACT


def test_lag_after_the_group_skipped_a_trimmed_gap_is_the_undelivered_count(
    redis_client: redis.Redis,
) -> None:
    """Redis 7 keeps counting trimmed entries in `lag`; the metric counts what is left to read."""
    fill(redis_client, "s", 100)
    redis_client.xgroup_create("s", "g", id="0")
    read(redis_client, "s", "g", 5)
    redis_client.xtrim("s", maxlen=50, approximate=False)
    read(redis_client, "s", "g", 1)  # skips the 45 trimmed entries, reads entry 51
    redis_lag = redis_client.xinfo_groups("s")[0]["lag"]
    assert redis_lag > 50  # more than the stream holds: the state this test is about
    assert observe(redis_client, "s").groups[0].lag == 49


def test_lag_beyond_the_scan_limit_is_an_estimate_within_bounds(redis_client: redis.Redis) -> None:
    """Where Redis cannot tell and more remain than the scan counts: an estimate within bounds."""
    ids = fill(redis_client, "s", 60)
    redis_client.xgroup_create("s", "mid", id=ids[9].decode())
    redis_client.xgroup_create("s", "start", id="0")
    mid, start = observe(redis_client, "s", scan=20).groups
    assert mid.lag_kind is LagKind.ESTIMATE
    assert 21 <= mid.lag <= 59
    # A group before the first entry needs no scan: everything is undelivered, exactly.
    assert (start.lag, start.lag_kind) == (60, LagKind.EXACT)


# -- entries trimmed before a group read them (retention "maxlen") ------------------------------


def facts(head: int, length: int, first: str, group: GroupFacts) -> StreamFacts:
    return StreamFacts(
        exists=True,
        length=length,
        first_id=first,
        last_id=f"{1000 + head + length}-0",
        entries_added=head + length,
        groups=(group,),
    )


def group(last: str, read: int | None) -> GroupFacts:
    return GroupFacts("g", 1, 0, last, read, 0, LagKind.EXACT, None)


def test_tracker_counts_only_the_entries_a_stopped_group_never_read() -> None:
    """Snapshots of a stream trimmed past a stopped group: each lost entry counted once."""
    tracker = UnreadTrimTracker()
    stopped = group("1010-0", 10)  # read 10 entries, then stopped
    assert tracker.observe("s", facts(0, 100, "1001-0", stopped)) == {}  # first sight
    # 50 entries trimmed: 40 of them (11..50) were never delivered to the group.
    assert tracker.observe("s", facts(50, 100, "1051-0", stopped)) == {"g": 40}
    assert tracker.observe("s", facts(50, 150, "1051-0", stopped)) == {}  # nothing new gone
    assert tracker.observe("s", facts(80, 120, "1081-0", stopped)) == {"g": 30}


def test_tracker_does_not_count_entries_the_group_read_before_the_trim() -> None:
    """A group ahead of the trimmed head lost nothing; one without a read counter is bounded."""
    tracker = UnreadTrimTracker()
    tracker.observe("s", facts(0, 100, "1001-0", group("1090-0", 90)))
    assert tracker.observe("s", facts(50, 100, "1051-0", group("1095-0", 95))) == {}
    # No read counter: only what was trimmed since the last snapshot counts.
    assert tracker.observe("s", facts(120, 80, "1121-0", group("1095-0", None))) == {"g": 70}


def test_monitor_counts_entries_trimmed_past_a_group_under_maxlen(
    redis_client: redis.Redis,
) -> None:
    """MAXLEN trims past a stopped group: forwarder_stream_trimmed_unread_total counts them."""
    fill(redis_client, "s", 100)
    redis_client.xgroup_create("s", "stopped", id="0")
    redis_client.xgroup_create("s", "reader", id="0")
    read(redis_client, "s", "stopped", 10)
    read(redis_client, "s", "reader", 100)
    monitor = monitor_for(redis_client, "s")
    assert monitor.run_round()
    redis_client.xtrim("s", maxlen=50, approximate=False)  # what the writer's MAXLEN does
    assert monitor.run_round()
    values = samples(monitor)
    assert group_value(values, "forwarder_stream_trimmed_unread_total", "s", "stopped") == 40
    assert group_value(values, "forwarder_stream_trimmed_unread_total", "s", "reader") == 0
    fill(redis_client, "s", 30)
    redis_client.xtrim("s", maxlen=50, approximate=False)
    assert monitor.run_round()
    values = samples(monitor)
    assert group_value(values, "forwarder_stream_trimmed_unread_total", "s", "stopped") == 70


# -- rounds: giving way, skipping, refusals -----------------------------------------------------


def test_round_is_skipped_while_the_writer_needs_redis(redis_client: redis.Redis) -> None:
    """A busy writer: no Redis call, the round is counted as skipped, old values stay; resumes."""
    fill(redis_client, "s", 5)
    reason: list[str | None] = [None]
    monitor = monitor_for(redis_client, "s", busy=lambda: reason[0])
    assert monitor.run_round()
    fill(redis_client, "s", 5)
    reason[0] = "5000 frames wait for the writer"
    before = redis_client.info("commandstats")
    assert not monitor.run_round()
    after = redis_client.info("commandstats")
    calls = {
        k: v["calls"] for k, v in after.items() if before.get(k, {}).get("calls") != v["calls"]
    }
    assert set(calls) <= {"cmdstat_info"}  # not one command of its own meanwhile
    values = samples(monitor)
    assert values[("forwarder_stream_length", (("stream", "s"),))] == 5  # the last observation
    assert values[("forwarder_consumer_rounds_skipped_total", (("reason", "writer"),))] == 1
    reason[0] = None
    assert monitor.run_round()
    assert samples(monitor)[("forwarder_stream_length", (("stream", "s"),))] == 10


def test_a_slow_chunk_ends_the_round(redis_client: redis.Redis) -> None:
    """Redis slower than the chunk budget: the rest of the round is skipped as "slow"."""
    clock = itertools.count(0.0, 0.6)  # each clock reading 0.6 s later: every chunk is "slow"
    streams = [f"s{i}" for i in range(6)]
    monitor = StreamMonitor(
        redis_client,
        lambda: streams,
        ConsumersConfig(interval=1.0),
        clock=lambda: next(clock),
        chunk=2,
    )
    assert not monitor.run_round()
    snap = monitor.snapshot()
    assert snap.skipped == {"slow": 1}
    assert sorted(snap.facts) == ["s0", "s1"]  # the first chunk was recorded, no more
    assert snap.rounds == 0


def test_writer_busy_names_a_silent_redis_or_a_backlog() -> None:
    """The predicate: no recent writer success, or too many frames waiting, is "busy"."""
    stats = WriterStats()
    waiting = [0]
    now = [100.0]
    busy = writer_busy(
        stats, lambda: waiting[0], backlog=1000, stale_after=15.0, clock=lambda: now[0]
    )
    assert busy() is not None  # never answered yet
    stats.last_ok_at = 95.0
    assert busy() is None
    waiting[0] = 1001
    assert "1001 frames" in (busy() or "")
    waiting[0] = 0
    now[0] = 111.0
    assert busy() is not None


@pytest.fixture
def limited_user(redis_client: redis.Redis) -> Iterator[Callable[[bool], redis.Redis]]:
    """A client for an ACL user that can do everything, except XINFO unless allowed."""
    clients: list[redis.Redis] = []

    def make(allow_xinfo: bool) -> redis.Redis:
        rules = ["reset", "on", ">pw", "~*", "+@all"] + ([] if allow_xinfo else ["-xinfo"])
        redis_client.execute_command("ACL", "SETUSER", "monitor", *rules)  # type: ignore[no-untyped-call]
        kwargs = redis_client.connection_pool.connection_kwargs
        client = redis.Redis(
            host=kwargs["host"], port=kwargs["port"], username="monitor", password="pw"
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    redis_client.acl_deluser("monitor")


def test_refused_commands_are_a_problem_until_a_round_completes(
    redis_client: redis.Redis, limited_user: Callable[[bool], redis.Redis]
) -> None:
    """NOPERM on XINFO: problem() (readiness) names it; granting the ACL clears it."""
    fill(redis_client, "s", 3)
    monitor = monitor_for(limited_user(False), "s")
    assert not monitor.run_round()
    problem = monitor.problem()
    assert problem is not None
    assert "noperm" in problem
    limited_user(True)  # the same user, now with XINFO
    assert monitor.run_round()
    assert monitor.problem() is None


def test_a_refused_observer_is_shown_but_does_not_make_forwarder_unready(
    redis_client: redis.Redis, limited_user: Callable[[bool], redis.Redis]
) -> None:
    """Under "maxlen" the monitor only observes: /readyz shows its problem and stays ready."""
    fill(redis_client, "s", 3)
    observer = monitor_for(limited_user(False), "s")
    assert not observer.run_round()
    ready, problem = observer.readiness()
    assert ready
    assert problem is not None
    assert "noperm" in problem
    retention = monitor_for(limited_user(False), "s", retention=Retention(None))
    assert not retention.run_round()
    assert retention.readiness()[0] is False


# -- in the daemon ------------------------------------------------------------------------------


def http_get(forwarder: Forwarder, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{forwarder.http.port}{path}", timeout=5
        ) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_daemon_exports_group_metrics_for_its_streams_and_stops_the_thread(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """A running forwarder reports its stream's group lag on /metrics; shutdown ends the thread."""
    config = make_config(
        {"main": ["messages.upsert"]}, stream="{event}", extra="[consumers]\ninterval = 0.2\n"
    )
    redis_client.xgroup_create("messages.upsert", "billing", id="0", mkstream=True)
    forwarder = run_forwarder(config)
    wait_for(lambda: simulator.stats()["connections_open"] == 1, what="connected")
    assert simulator.send("main", "messages.upsert", 30) == 30
    wait_for(
        lambda: (
            'forwarder_consumer_group_lag{group="billing",stream="messages.upsert"} 30.0'
            in http_get(forwarder, "/metrics")[1]
        ),
        what="lag 30 on /metrics",
    )
    assert forwarder.consumers.is_alive()
    forwarder.shutdown()
    assert not forwarder.consumers._thread.is_alive()


def test_readyz_is_503_while_redis_refuses_retention_acked(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    limited_user: Callable[[bool], redis.Redis],
) -> None:
    """Retention "acked" refused by Redis: /readyz 503 names it (no password), 200 once allowed."""
    fill(redis_client, "main:messages.upsert", 1)  # XINFO runs on streams that exist
    limited_user(False)
    url = redis_server.url.replace("redis://", "redis://monitor:pw@")
    config = make_config(
        {"main": ["messages.upsert"]},
        environ={"FORWARDER_REDIS_URL": url},
        redis_extra='retention = "acked"',
        extra="[consumers]\ninterval = 0.2\n",
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: forwarder.consumers.problem() is not None, what="the monitor refused")
    status, body = http_get(forwarder, "/readyz")
    assert status == 503
    assert "noperm" in json.loads(body)["consumers_error"]
    assert ":pw@" not in http_get(forwarder, "/readyz")[1]
    wait_for(lambda: forwarder.stats[0].state.value == "connected", what="connected")
    limited_user(True)
    wait_for(lambda: http_get(forwarder, "/readyz")[0] == 200, what="ready again")


# -- cost at fleet scale --------------------------------------------------------------------------


def test_round_length_grows_with_the_streams_beyond_the_visit_rate() -> None:
    """A round lasts `interval` until the streams exceed streams_per_second x interval."""
    assert round_seconds(13, 10.0, 250.0) == 10.0
    assert round_seconds(2_500, 10.0, 250.0) == 10.0
    assert round_seconds(10_010, 10.0, 250.0) == pytest.approx(40.04)
    assert round_seconds(10_010, 10.0, 0.0) == 10.0  # 0: no bound


def test_the_monitor_thread_visits_no_more_streams_per_second_than_allowed(
    redis_client: redis.Redis,
) -> None:
    """40 streams at 100 per second: the thread's rounds start 0.4 s apart, not `interval`."""
    streams = [f"s{i}" for i in range(40)]
    for stream in streams:
        fill(redis_client, stream, 1)
    calls: list[float] = []  # when each round asked for the streams (its start)

    def listed() -> list[str]:
        calls.append(time.monotonic())
        return streams

    monitor = StreamMonitor(
        redis_client,
        listed,
        ConsumersConfig(interval=0.1, streams_per_second=100.0),
        chunk=10,
    )
    monitor.start()
    try:
        wait_for(lambda: len(calls) >= 3, 10, "three rounds")
    finally:
        monitor.stop()
        monitor.join(5)
    assert monitor.failed is None
    # Waits never end early, so each round starts 0.4 s after the one before, less the
    # moment between a round's start and its listing (0.05 s is ample); unbounded: 0.1 s.
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps[:2]) >= 0.35

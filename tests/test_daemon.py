"""The whole daemon against the simulator and a real Redis: delivery, reconnects, shutdown."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import load_config
from forwarder.daemon import Forwarder
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import wait_for, xrange

FAST = "backoff = { initial = 0.05, maximum = 0.2, auth_initial = 0.2, auth_maximum = 10.0 }"


def connected(forwarder: Forwarder) -> bool:
    return all(s.state.value == "connected" for s in forwarder.stats if s.configured)


def holders_open(sim: Simulator, slots: list[tuple[str, str]]) -> bool:
    stats = sim.stats()["slots"]
    return all(stats.get(i, {}).get(e, {}).get("holder_open") for i, e in slots)


def get(forwarder: Forwarder, path: str) -> bytes:
    url = f"http://127.0.0.1:{forwarder.http.port}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def samples(forwarder: Forwarder) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = get(forwarder, "/metrics").decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_frames_from_two_sources_land_exactly_once_in_order_with_the_four_fields(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """N frames on several events of two sources: each once, in order, byte for byte."""
    sources = {
        "alpha": ["messages.upsert", "connection.update", "chats.upsert"],
        "beta": ["messages.upsert", "qrcode.updated"],
    }
    forwarder = run_forwarder(make_config(sources))
    slots = [(name, event) for name, events in sources.items() for event in events]
    wait_for(lambda: holders_open(simulator, slots), what="all subscriptions connected")
    counts = {event: 40 if event == "qrcode.updated" else 400 for _, event in slots}
    for instance, event in slots:
        assert simulator.send(instance, event, counts[event]) == counts[event]
    total = sum(counts[e] for _, e in slots)
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == total, what="all forwarded")
    for instance, event in slots:
        entries = xrange(redis_client, f"{instance}:{event}")
        assert [f[b"data"] for _, f in entries] == simulator.delivered_frames(instance, event)
        for entry_id, fields in entries:
            assert set(fields) == {b"data", b"event", b"source", b"received_at"}
            assert fields[b"event"] == event.encode()
            assert fields[b"source"] == instance.encode()
            # received_at (our clock, ms) precedes the entry ID's time (Redis' clock, ms).
            written_ms = int(entry_id.split(b"-")[0])
            assert 0 <= written_ms - int(fields[b"received_at"]) < 5000
    assert not redis_client.exists("alpha:messages.upsert:dlq")


def test_upstream_restart_is_seen_as_1006_counted_and_reconnected(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """The server vanishes without a close frame and comes back: reconnect, count, lose nothing."""
    forwarder = run_forwarder(make_config({"main": ["messages.upsert"]}, extra_source=FAST))
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.send("main", "messages.upsert", 100)
    port = simulator.port
    simulator.stop()  # the upstream process dies: TCP closed, no close frame
    wait_for(lambda: forwarder.stats[0].close_codes["1006"] == 1, what="1006 counted")
    wait_for(lambda: forwarder.stats[0].handshake_failures.get("error", 0) >= 1, what="refused")
    restarted = Simulator(secret=simulator._secret, port=port, record=True)
    restarted.start()
    try:
        wait_for(lambda: holders_open(restarted, [("main", "messages.upsert")]), what="reconnect")
        restarted.send("main", "messages.upsert", 100)
        wait_for(lambda: forwarder.stats[0].forwarded == 200, what="200 forwarded")
        assert redis_client.xlen("main:messages.upsert") == 200
        stats = forwarder.stats[0]
        assert stats.reconnects >= 2  # at least one refused attempt, then the successful one
        assert stats.last_close_code == "1006"
        assert stats.state.value == "connected"
    finally:
        restarted.stop()


def test_dropped_connection_reconnects_and_both_sides_of_the_drop_arrive(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """A TCP drop mid-stream: every frame delivered before and after it lands exactly once."""
    forwarder = run_forwarder(make_config({"main": ["chats.upsert"]}, extra_source=FAST))
    slot = [("main", "chats.upsert")]
    wait_for(lambda: holders_open(simulator, slot), what="connected")
    simulator.send("main", "chats.upsert", 300)
    assert simulator.drop("main", "chats.upsert") == 1
    wait_for(lambda: forwarder.stats[0].reconnects == 1, what="reconnect")
    wait_for(lambda: holders_open(simulator, slot), what="connected again")
    simulator.send("main", "chats.upsert", 300)
    wait_for(lambda: forwarder.stats[0].forwarded == 600, what="600 forwarded")
    got = [f[b"data"] for _, f in xrange(redis_client, "main:chats.upsert")]
    assert got == simulator.delivered_frames("main", "chats.upsert")
    assert len(got) == 600


def test_401_is_counted_and_retried_with_growing_delays(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """A rejected handshake is counted by status and retried slowly, never in a hot loop."""
    simulator.reject(count=-1)
    forwarder = run_forwarder(
        make_config({"main": ["qrcode.updated"]}, extra_source=FAST), rand=lambda: 1.0
    )
    stats = forwarder.stats[0]
    # Delays with rand=1: 0.2, 0.4, 0.8, 1.6 s -> attempts at 0, 0.2, 0.6, 1.4, 3.0 s.
    wait_for(lambda: stats.handshake_failures["401"] >= 4, what="four 401s")
    _ = simulator.stats()
    at_four = stats.handshake_failures["401"]
    wait_for(lambda: stats.next_attempt_at is not None, what="backing off")
    assert stats.next_attempt_at is not None
    assert at_four == 4
    assert simulator.stats()["rejected"] == 4
    assert stats.last_handshake_status == "401"
    assert stats.state.value == "backoff"
    assert stats.close_codes == {"1006": 0}
    simulator.heal()
    wait_for(lambda: connected(forwarder), 10.0, "connected once the server accepts")


def test_metrics_and_status_match_what_happened(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """/metrics and /status report the same counts the test produced."""
    forwarder = run_forwarder(
        make_config({"main": ["messages.upsert", "call.upsert"]}, extra_source=FAST)
    )
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.send("main", "messages.upsert", 25)
    simulator.send_raw("main", "messages.upsert", b"{not json")
    simulator.drop("main", "messages.upsert")
    wait_for(lambda: forwarder.stats[0].reconnects == 1 and connected(forwarder), what="back")
    wait_for(lambda: forwarder.stats[0].forwarded == 25, what="forwarded")
    wait_for(lambda: forwarder.writer_stats.last_ok_at is not None, what="redis answered")
    wait_for(lambda: forwarder.stats[0].gaps_recorded == 1, what="the gap record written")
    m = samples(forwarder)
    up = (("event", "messages.upsert"), ("source", "main"))
    call = (("event", "call.upsert"), ("source", "main"))
    assert m[("forwarder_messages_received_total", up)] == 26
    assert m[("forwarder_messages_forwarded_total", up)] == 25
    assert m[("forwarder_reconnects_total", up)] == 1
    assert m[("forwarder_gap_records_total", up)] == 1  # the drop's blind interval
    assert m[("forwarder_close_codes_total", (("code", "1006"), *up))] == 1
    assert (
        m[
            (
                "forwarder_invalid_messages_total",
                (("event", "messages.upsert"), ("reason", "invalid_json"), ("source", "main")),
            )
        ]
        == 1
    )
    # The default detail ("event"): subscriptions counted by state, latency by event only.
    assert m[("forwarder_subscriptions", (("source", "main"), ("state", "connected")))] == 2
    assert m[("forwarder_messages_received_total", call)] == 0  # initialised at zero
    assert (
        m[
            (
                "forwarder_handshake_failures_total",
                (("event", "call.upsert"), ("source", "main"), ("status", "401")),
            )
        ]
        == 0
    )
    assert m[("forwarder_forward_latency_seconds_count", (("event", "messages.upsert"),))] == 25
    assert m[("forwarder_last_message_timestamp_seconds", up)] > 1.7e9
    assert m[("forwarder_build_info", (("version", "0.1.0"),))] == 1
    status = json.loads(get(forwarder, "/status"))
    sub = status["subscriptions"][0]
    assert (sub["source"], sub["event"]) == ("main", "messages.upsert")
    assert sub["stream"] == "main:messages.upsert"
    assert (sub["received"], sub["forwarded"], sub["reconnects"]) == (26, 25, 1)
    assert sub["dead_lettered"] == {"invalid_json": 1}
    assert sub["last_close_code"] == "1006"
    assert sub["state"] == "connected"
    assert sub["last_message_age_seconds"] < 60
    assert json.loads(get(forwarder, "/healthz"))["healthy"] is True
    assert json.loads(get(forwarder, "/readyz"))["ready"] is True


def test_readyz_fails_while_a_subscription_is_down(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """With the default policy (all connected), one rejected subscription makes /readyz 503."""
    simulator.reject(count=-1, event="call.upsert")
    forwarder = run_forwarder(make_config({"main": ["messages.upsert", "call.upsert"]}))
    wait_for(lambda: forwarder.stats[0].state.value == "connected", what="one connected")
    wait_for(lambda: forwarder.writer_stats.last_ok_at is not None, what="redis answered")
    ok, body = forwarder.ready()
    assert not ok
    assert body["connected"] == 1
    assert body["redis_ok"] is True
    with pytest.raises(urllib.error.HTTPError) as info:
        get(forwarder, "/readyz")
    assert info.value.code == 503


def holder(sim: Simulator, instance: str, event: str) -> object:
    slot = sim.stats()["slots"].get(instance, {}).get(event, {})
    return slot.get("holder") if slot.get("holder_open") else None


def test_reload_keeps_unchanged_subscriptions_and_starts_and_stops_the_others(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGHUP's reload: the same connection for unchanged events, new and removed ones follow."""
    config = make_config({"main": ["messages.upsert", "chats.upsert"]})
    assert config.path is not None
    path = config.path
    forwarder = run_forwarder(config, reload=lambda: load_config(path, {}))
    wait_for(lambda: connected(forwarder), what="connected")
    before = holder(simulator, "main", "messages.upsert")
    path.write_text(path.read_text().replace('"chats.upsert"', '"call.upsert"'))
    assert forwarder.reload()
    wait_for(lambda: holder(simulator, "main", "call.upsert") is not None, what="call.upsert")
    wait_for(lambda: holder(simulator, "main", "chats.upsert") is None, what="chats.upsert gone")
    assert holder(simulator, "main", "messages.upsert") == before  # not reconnected
    assert [s.subscription.event for s in forwarder.subscribers] == [
        "messages.upsert",
        "call.upsert",
    ]
    simulator.send("main", "call.upsert", 5)
    wait_for(lambda: redis_client.xlen("main:call.upsert") == 5, what="new subscription writes")
    path.write_text("this is = not toml")
    assert not forwarder.reload()
    assert "reload refused, the running configuration stays" in caplog.text
    assert len(forwarder.subscribers) == 2
    assert connected(forwarder)


def test_reload_publishes_new_lists_and_never_grows_the_ones_readers_hold(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """A reload that adds events replaces `stats` (read by /metrics, /status, the writer) with
    a longer copy: a reader's snapshot keeps its length, and /status answers throughout."""
    config = make_config({"main": ["messages.upsert"]})
    assert config.path is not None
    path = config.path
    forwarder = run_forwarder(config, reload=lambda: load_config(path, {}))
    wait_for(lambda: connected(forwarder), what="connected")
    snapshot = forwarder.stats
    running = forwarder.subscribers
    path.write_text(
        path.read_text().replace('"messages.upsert"', '"messages.upsert", "call.upsert"')
    )
    assert forwarder.reload()
    assert len(snapshot) == 1  # the old list was not grown under its readers
    assert forwarder.stats is not snapshot
    assert [s.event for s in forwarder.stats] == ["messages.upsert", "call.upsert"]
    assert forwarder.subscribers[0] is running[0]  # kept, not restarted
    wait_for(lambda: connected(forwarder), what="both connected")
    status = json.loads(get(forwarder, "/status"))
    assert [s["event"] for s in status["subscriptions"]] == ["messages.upsert", "call.upsert"]


def test_apply_starts_missing_stops_gone_and_keeps_unchanged_subscriptions(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """_apply(config): the one path for start-up, reloads and discovery (later: leases)."""
    config = make_config({"main": ["messages.upsert", "chats.upsert"]})
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), what="connected")
    kept, leaving = forwarder.subscribers
    events = ("messages.upsert", "call.upsert")
    wanted = replace(config, sources=(replace(config.sources[0], events=events),))
    with forwarder._apply_lock:
        assert forwarder._apply(wanted, "left the desired set") == (1, 1, 1)
    assert leaving.finished
    assert forwarder.subscribers[0] is kept
    assert [r.subscription.event for r in forwarder.subscribers] == [
        "messages.upsert",
        "call.upsert",
    ]
    wait_for(lambda: holder(simulator, "main", "call.upsert") is not None, what="started")
    wait_for(lambda: holder(simulator, "main", "chats.upsert") is None, what="stopped")
    slots = simulator.stats()["slots"]["main"]
    assert slots["chats.upsert"]["client_closes"] == {"1001": 1}  # left politely

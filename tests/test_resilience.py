"""Upstream resilience against the simulator's fault switches and a real Redis.

Dead connections (blackhole, stall), reconnects by cause, 401 storms, displacement by another
client and its gap record, make-before-break re-subscribes, flapping between two forwarders,
bad frames, token expiry, and a 1,000-subscription reconnect storm.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import redis
import websocket
from prometheus_client.parser import text_string_to_metric_families

from forwarder.backoff import ReconnectBackoff
from forwarder.config import Backoff, IOConfig, Secret, SourceConfig, Subscription, TokenRef
from forwarder.daemon import Forwarder
from forwarder.engine import Engine
from forwarder.events import ALLOWED_EVENTS
from forwarder.handshake import Connection, websocket_connect
from forwarder.spool import DiskSpool, Entry
from forwarder.stats import State, SubscriptionStats
from forwarder_sim import Simulator, mint_token
from forwarder_sim.server import _bad_frame
from tests.conftest import SECRET, ConfigFactory
from tests.helpers import wait_for, xrange

FAST = """
ping_interval = 0.3
ping_timeout = 0.3
read_timeout = 0.5
backoff = { initial = 0.05, maximum = 0.2, auth_initial = 0.2, auth_maximum = 0.8 }
"""
UP = "messages.upsert"
GAPS = "forwarder:gaps"
_PAUSE = threading.Event()  # never set: an interruptible pause


def pause(seconds: float) -> None:
    _PAUSE.wait(seconds)


def connected(forwarder: Forwarder) -> bool:
    return all(s.state is State.CONNECTED for s in forwarder.stats)


def slot(sim: Simulator, instance: str = "main", event: str = UP) -> dict[str, object]:
    return cast(dict[str, object], sim.stats()["slots"].get(instance, {}).get(event, {}))


def slot_connections(sim: Simulator, instance: str = "main", event: str = UP) -> int:
    return cast(int, slot(sim, instance, event).get("connections", 0))


def gaps(client: redis.Redis) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in xrange(client, GAPS)
    ]


def metric(forwarder: Forwarder, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{forwarder.http.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def is_subsequence(part: list[bytes], whole: list[bytes]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


# -- dead connections -------------------------------------------------------------------------


def test_blackholed_connection_is_detected_within_ping_interval_plus_timeout_and_replaced(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """A peer that goes silent (no FIN, pings unanswered) is replaced; the gap is recorded."""
    forwarder = run_forwarder(make_config({"main": [UP]}, extra_source=FAST))
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.send("main", UP, 10)
    wait_for(lambda: stats.forwarded == 10, what="10 forwarded")
    started = time.monotonic()
    assert simulator.blackhole("main", UP) == 1
    wait_for(lambda: stats.close_codes["1006"] == 1, 5.0, "the dead connection detected")
    detected = time.monotonic() - started
    assert detected < 0.3 + 0.3 + 1.5  # ping_interval + ping_timeout, with slack for CI
    wait_for(lambda: slot_connections(simulator) == 2 and connected(forwarder), what="replaced")
    simulator.send("main", UP, 10)
    wait_for(lambda: stats.forwarded == 20, what="20 forwarded")
    assert [f[b"data"] for _, f in xrange(redis_client, f"main:{UP}")] == (
        simulator.delivered_frames("main", UP)
    )
    wait_for(lambda: stats.gaps_recorded == 1, what="the gap record written")
    (gap,) = gaps(redis_client)
    assert (gap["source"], gap["event"], gap["cause"]) == ("main", UP, "close:1006")
    assert "pong" in gap["detail"]
    assert gap["recovered"] == "1"
    assert 0 <= int(gap["end"]) - int(gap["start"]) < 5000


def test_peer_stalling_mid_frame_hits_the_read_timeout_and_is_replaced(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """Half a frame then silence: reconnect after read_timeout; later frames are delivered."""
    forwarder = run_forwarder(make_config({"main": [UP]}, extra_source=FAST))
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    assert simulator.stall_mid_frame("main", UP) == 1
    wait_for(lambda: stats.close_codes["1006"] == 1, 5.0, "the stall detected")
    assert stats.last_error is not None
    assert "middle of a frame" in stats.last_error
    wait_for(lambda: slot_connections(simulator) == 2 and connected(forwarder), what="replaced")
    simulator.send("main", UP, 5)
    wait_for(lambda: stats.forwarded == 5, what="5 forwarded")
    wait_for(lambda: stats.gaps_recorded == 1, what="the gap record written")
    assert "stalled" in gaps(redis_client)[0]["detail"]


def test_shutdown_does_not_hang_on_a_socket_stalled_mid_frame(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """A stalled peer never echoes our close frame: shutdown still ends in seconds."""
    forwarder = run_forwarder(
        make_config({"main": [UP]}, extra_source="read_timeout = 60.0\nping_interval = 60.0")
    )
    wait_for(lambda: connected(forwarder), what="connected")
    assert simulator.stall_mid_frame("main", UP) == 1
    wait_for(lambda: bool(slot(simulator).get("injected")), what="stall injected")
    started = time.monotonic()
    forwarder.shutdown()
    assert time.monotonic() - started < 6.0  # close-echo grace (2 s) + socket shutdown
    assert forwarder.subscribers[0].finished
    assert not any(loop.is_alive() for loop in forwarder.engine.loops)


@pytest.mark.parametrize("code", [1001, 1011])
def test_server_close_codes_are_counted_retried_quickly_and_recorded_as_gaps(
    code: int,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """1001/1011 from the server: counted by code, quick reconnect, gap cause close:CODE."""
    forwarder = run_forwarder(make_config({"main": [UP]}, extra_source=FAST))
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    started = time.monotonic()
    assert simulator.close("main", UP, code=code) == 1
    wait_for(lambda: slot_connections(simulator) == 2 and connected(forwarder), what="back")
    assert time.monotonic() - started < 3.0  # first retry within backoff.initial (0.05 s)
    assert stats.close_codes[str(code)] == 1
    wait_for(lambda: stats.gaps_recorded == 1, what="the gap record written")
    assert gaps(redis_client)[0]["cause"] == f"close:{code}"


# -- handshake failures -----------------------------------------------------------------------


def test_401_storm_backs_off_slowly_and_logs_an_error_without_the_token(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Endless 401s: few attempts over time, an ERROR naming the causes, a startup gap."""
    caplog.set_level(logging.INFO)
    simulator.reject(count=-1)
    forwarder = run_forwarder(make_config({"main": [UP]}, extra_source=FAST), rand=lambda: 1.0)
    # auth delays with rand=1: 0.2, 0.4, 0.8, 0.8 ... -> attempts at 0, 0.2, 0.6, 1.4, 2.2 s.
    pause(1.0)
    early = simulator.stats()["rejected"]
    pause(1.5)
    late = simulator.stats()["rejected"]
    assert 2 <= early <= 4
    assert 1 <= late - early <= 3  # 0.8 s apart at most: a hot loop would make hundreds
    assert forwarder.stats[0].handshake_failures["401"] == late
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("expired" in m and "event name" in m and "401" in m for m in errors)
    token = (tmp_path / "main.token").read_text().strip()
    assert token not in caplog.text
    simulator.heal()
    wait_for(lambda: connected(forwarder), 5.0, "connected once the server accepts")
    wait_for(lambda: forwarder.stats[0].gaps_recorded == 1, what="the startup gap written")
    (gap,) = gaps(redis_client)
    assert (gap["cause"], gap["handshake"]) == ("startup", "401")
    assert int(gap["attempts"]) >= late


def test_a_rotated_token_file_is_read_before_the_next_attempt(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    tmp_path: Path,
) -> None:
    """A token signed with the wrong secret fails; writing a good one fixes it, no restart."""
    config = make_config({"main": [UP]}, extra_source=FAST)
    token_file = tmp_path / "main.token"
    token_file.write_text(mint_token("main", "another-secret") + "\n")
    forwarder = run_forwarder(config)
    wait_for(lambda: forwarder.stats[0].handshake_failures["401"] >= 2, what="two 401s")
    assert not connected(forwarder)
    token_file.write_text(mint_token("main", SECRET) + "\n")
    wait_for(lambda: connected(forwarder), 5.0, "connected with the rotated token")


# -- displacement -----------------------------------------------------------------------------


def test_displacement_by_another_client_is_recovered_within_the_watchdog_window(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """Another client takes the feed and leaves: the watchdog takes it back, gap recorded."""
    forwarder = run_forwarder(
        make_config({"main": [UP]}, extra_source=FAST + "silence_timeout = 0.6\n")
    )
    stats = forwarder.stats[0]
    simulator.set_rate(UP, 200.0, instance="main")
    wait_for(lambda: stats.received > 20, what="traffic flowing")
    # Like the instance's QR page opened and closed: the slot keeps pointing at a dead socket.
    other = websocket.create_connection(simulator.url_for("main", UP), timeout=5)
    other.close()
    displaced_at = time.monotonic()
    wait_for(lambda: stats.displacements == 1, 5.0, "the displacement detected")
    assert time.monotonic() - displaced_at < 0.6 + 2.0  # silence_timeout, plus slack
    received = stats.received
    wait_for(lambda: stats.received > received + 20, what="traffic flowing again")
    simulator.set_rate(UP, 0.0, instance="main")
    wait_for(lambda: stats.gaps_recorded == 1 and stats.forwarded == stats.received, what="all")
    (gap,) = gaps(redis_client)
    assert (gap["source"], gap["event"], gap["cause"], gap["recovered"]) == (
        "main",
        UP,
        "watchdog",
        "1",
    )
    assert 500 <= int(gap["end"]) - int(gap["start"]) < 4000
    assert stats.reconnects == 0  # recovered without ever disconnecting
    assert stats.resubscribes["silence"] >= 1
    got = [f[b"data"] for _, f in xrange(redis_client, f"main:{UP}")]
    assert len(set(got)) == len(got)
    assert is_subsequence(got, simulator.delivered_frames("main", UP))
    assert metric(forwarder, "forwarder_displacements_total", source="main", event=UP) == 1
    assert (
        metric(forwarder, "forwarder_resubscribes_total", source="main", event=UP, reason="silence")
        >= 1
    )
    blind = metric(forwarder, "forwarder_disconnected_seconds_total", source="main", event=UP)
    assert 0.5 <= blind < 4.0


def test_periodic_make_before_break_resubscribe_loses_nothing_in_flight(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """Re-subscribing every 0.4 s under 500 frames/s: every frame once, in order, no gap."""
    forwarder = run_forwarder(
        make_config(
            {"main": [UP]},
            extra_source=FAST + "silence_timeout = 0.0\nresubscribe_interval = 0.4\n",
        )
    )
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.set_rate(UP, 500.0, instance="main")
    wait_for(lambda: stats.resubscribes["periodic"] >= 4, 10.0, "four re-subscribes")
    simulator.set_rate(UP, 0.0, instance="main")
    pause(0.2)  # frames already written by the generator reach us
    delivered = simulator.delivered_frames("main", UP)
    assert len(delivered) > 500
    wait_for(lambda: stats.forwarded == len(delivered), 10.0, "every delivered frame forwarded")
    assert [f[b"data"] for _, f in xrange(redis_client, f"main:{UP}")] == delivered
    assert slot_connections(simulator) >= 5
    assert (stats.reconnects, stats.displacements, stats.close_codes["1006"]) == (0, 0, 0)
    assert gaps(redis_client) == []


def test_a_quiet_event_resubscribes_on_silence_but_is_never_taken_for_displaced(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """call.upsert stays silent: the watchdog re-subscribes, but no displacement, no flapping."""
    forwarder = run_forwarder(
        make_config(
            {"main": ["call.upsert"]},
            extra_source=FAST + "silence_timeout = 0.5\nflap_threshold = 1\n",
        )
    )
    stats = forwarder.stats[0]
    wait_for(lambda: stats.resubscribes["silence"] >= 4, 10.0, "four silence re-subscribes")
    assert (stats.displacements, stats.flapping_until, stats.reconnects) == (0, None, 0)
    simulator.send("main", "call.upsert", 1)  # one call, as quiet events get them
    wait_for(lambda: stats.forwarded == 1, what="a late call forwarded")
    assert (stats.displacements, stats.flapping_until) == (0, None)
    assert gaps(redis_client) == []


def test_two_forwarders_on_one_token_detect_flapping_and_stop_fighting(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two forwarders keep displacing each other: flapping is logged and the fight stops."""
    caplog.set_level(logging.WARNING)
    config = make_config(
        {"main": [UP]},
        extra_source=FAST
        + "silence_timeout = 0.5\nflap_threshold = 3\nflap_window = 30.0\nflap_backoff = 60.0\n",
    )
    simulator.set_rate(UP, 200.0, instance="main")
    first = run_forwarder(config)
    wait_for(lambda: first.stats[0].received > 0, what="the first forwarder receiving")
    # A second process: its own spool, the same token and event.
    second = run_forwarder(replace(config, spool=replace(config.spool, dir=tmp_path / "spool2")))
    both = (first.stats[0], second.stats[0])
    wait_for(lambda: any(s.flapping_until is not None for s in both), 20.0, "flapping detected")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("flapping" in m and "same token" in m for m in errors)
    pause(1.5)  # at most one more take-over by the side that has not stood down yet
    settled = slot_connections(simulator)
    pause(2.5)  # five watchdog periods
    assert slot_connections(simulator) == settled
    received = sum(s.received for s in both)
    wait_for(lambda: sum(s.received for s in both) > received + 50, what="one of them receiving")
    assert sum(s.displacements for s in both) >= 3


# -- bad frames -------------------------------------------------------------------------------

BAD_FRAMES: dict[str, tuple[Callable[[Simulator], int], str]] = {
    "invalid_json": (lambda s: s.invalid_json("main", UP), "invalid_json"),
    "invalid_utf8": (lambda s: s.invalid_utf8("main", UP), "invalid_utf8"),
    "binary": (lambda s: s.binary("main", UP), "binary"),
    "deep_json": (lambda s: s.deep_json("main", UP, depth=5000), "too_deep"),
    "huge_int": (lambda s: s.huge_int("main", UP, digits=5000), "number_too_large"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FRAMES))
def test_a_bad_frame_is_dead_lettered_and_the_connection_stays_up(
    kind: str,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """Each bad-frame kind: dead-lettered with reason and raw bytes, the next frames delivered."""
    inject, reason = BAD_FRAMES[kind]
    forwarder = run_forwarder(make_config({"main": [UP]}, extra_source=FAST))
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.send("main", UP, 3)
    assert inject(simulator) == 1
    simulator.send("main", UP, 3)
    wait_for(lambda: stats.forwarded == 6 and stats.invalid.get(reason) == 1, what="routed")
    assert (stats.reconnects, slot_connections(simulator)) == (0, 1)
    assert [f[b"data"] for _, f in xrange(redis_client, f"main:{UP}")] == (
        simulator.delivered_frames("main", UP)
    )
    (entry,) = xrange(redis_client, f"main:{UP}:dlq")
    fields = entry[1]
    params = {"depth": 5000, "digits": 5000}
    raw, opcode = _bad_frame(kind, **params)
    assert fields[b"reason"] == reason.encode()
    assert (fields[b"event"], fields[b"source"]) == (UP.encode(), b"main")
    assert (int(fields[b"opcode"]), int(fields[b"size"]), fields[b"truncated"]) == (
        opcode,
        len(raw),
        b"0",
    )
    assert base64.b64decode(fields[b"data_base64"]) == raw
    labels = {"source": "main", "event": UP, "reason": reason}
    assert metric(forwarder, "forwarder_invalid_messages_total", **labels) == 1


@pytest.mark.fault
@pytest.mark.parametrize("kind", ["rsv1", "long_close", "huge_length"])
def test_a_protocol_error_after_valid_frames_loses_none_of_them(
    kind: str,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """Frames, then a violation in the same write (RSV1, a 128-byte close reason, a header
    claiming 2^62 bytes): every delivered frame lands once, in order; the connection is failed
    with 1002, a gap recorded, and traffic resumes on the next connection."""
    forwarder = run_forwarder(make_config({"main": [UP]}, extra_source=FAST))
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.send("main", UP, 5)
    assert simulator.protocol_error("main", UP, kind, before=3) == 3
    wait_for(lambda: stats.close_codes.get("1002") == 1, 5.0, "the violation detected")
    wait_for(lambda: slot_connections(simulator) == 2 and connected(forwarder), what="back")
    simulator.send("main", UP, 5)
    wait_for(lambda: stats.forwarded == 13, what="13 forwarded")
    assert [f[b"data"] for _, f in xrange(redis_client, f"main:{UP}")] == (
        simulator.delivered_frames("main", UP)
    )
    assert len(simulator.delivered_frames("main", UP)) == 13
    wait_for(lambda: stats.gaps_recorded == 1, what="the gap record written")
    (gap,) = gaps(redis_client)
    assert gap["cause"] == "close:1002"
    assert slot(simulator)["client_closes"] == {"1002": 1}


def test_an_oversized_frame_is_skipped_in_bounded_memory_and_dead_lettered_with_its_hash(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """A 24 MiB frame over a 64 KiB limit: head + sha256 kept, memory flat, connection up."""
    size = 24 * 1024 * 1024
    forwarder = run_forwarder(
        make_config({"main": [UP]}, extra_source=FAST + "max_frame_bytes = 65536\n")
    )
    stats = forwarder.stats[0]
    wait_for(lambda: connected(forwarder), what="connected")
    simulator.send("main", UP, 2)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert simulator.oversized("main", UP, size=size) == 1
        wait_for(lambda: stats.received == 3, 10.0, "the oversized frame received")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 4  # nothing close to the frame is ever held (simulator included)
    simulator.send("main", UP, 2)
    wait_for(lambda: stats.forwarded == 4 and stats.invalid.get("too_large") == 1, what="routed")
    assert (stats.reconnects, slot_connections(simulator)) == (0, 1)
    head = b'{"keyId":"3EB0OVERSIZED","messageType":"conversation","content":{"text":"'
    tail = b'"}}'
    digest = hashlib.sha256(head)
    left = size - len(head) - len(tail)
    chunk = b"x" * 65536
    while left:
        digest.update(chunk[: min(left, len(chunk))])
        left -= min(left, len(chunk))
    digest.update(tail)
    ((_, fields),) = xrange(redis_client, f"main:{UP}:dlq")
    assert (fields[b"reason"], int(fields[b"size"]), fields[b"truncated"]) == (
        b"too_large",
        size,
        b"1",
    )
    assert fields[b"sha256"].decode() == digest.hexdigest()
    assert base64.b64decode(fields[b"data_base64"]) == (head + b"x" * 1024)[:1024]


# -- token expiry -----------------------------------------------------------------------------


def test_token_expiry_is_exported_and_warned_once_per_source_ahead_of_time(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token expiring in 10 min (warning at 15): one WARNING for the source, and the metric."""
    caplog.set_level(logging.WARNING)
    config = make_config({"main": [UP, "call.upsert"]}, extra_source=FAST)
    token = mint_token("main", SECRET, expires_in=600)
    (tmp_path / "main.token").write_text(token + "\n")
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), what="connected")
    exp = float(int(time.time()) + 600)
    assert (
        abs(metric(forwarder, "forwarder_token_expiry_timestamp_seconds", source="main") - exp) <= 2
    )
    warnings = [r.getMessage() for r in caplog.records if "expires at" in r.getMessage()]
    assert len(warnings) == 1  # two subscriptions read the token; one warning
    assert "401" in warnings[0]
    assert token not in caplog.text


# -- reconnect storm --------------------------------------------------------------------------


class _NullSpool:
    """Accepts and forgets entries (the storm test only looks at connection attempts)."""

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        return True

    def pending(self) -> tuple[int, int]:
        return 0, 0

    def wait_for_writer(self, timeout: float) -> None:
        """No writer: never holds a loop back."""


def test_a_reconnect_storm_of_1000_subscriptions_is_spread_out_by_jitter(
    simulator: Simulator,
) -> None:
    """1,000 subscriptions dropped at once do not come back at once: full jitter spreads them."""
    count = 1000
    per_source = len(ALLOWED_EVENTS)
    attempts: list[float] = []
    lock = threading.Lock()

    def connect(url: str, timeout: float) -> Connection:
        with lock:
            attempts.append(time.monotonic())
        return websocket_connect(url, timeout)

    rng = random.Random(7)
    # The limiter out of the way: jitter alone must spread the attempts.
    io = IOConfig(loops=2, handshake_threads=16, connect_rate=1e6, connect_burst=count)
    engine = Engine(io, cast(DiskSpool, _NullSpool()), connect)
    engine.start()
    all_stats: list[SubscriptionStats] = []
    try:
        for i in range(count):
            instance = f"storm{i // per_source}"
            source = SourceConfig(
                name=instance,
                url=simulator.url,
                token=TokenRef(value=Secret(mint_token(instance, SECRET)), origin="test"),
                events=ALLOWED_EVENTS,
                backoff=Backoff(initial=1.0, maximum=1.0),
            )
            event = ALLOWED_EVENTS[i % per_source]
            sub = Subscription(source, event, f"{instance}:{event}", f"{instance}:{event}:dlq")
            stats = SubscriptionStats(instance, event, sub.stream)
            all_stats.append(stats)
            engine.add(i, sub, stats, ReconnectBackoff(source.backoff, rng.random))
        wait_for(
            lambda: all(st.state is State.CONNECTED for st in all_stats), 30.0, "all connected"
        )
        dropped_at = time.monotonic()
        assert simulator.drop() == count
        wait_for(
            lambda: all(st.reconnects == 1 and st.state is State.CONNECTED for st in all_stats),
            30.0,
            "all reconnected",
        )
        with lock:
            offsets = sorted(t - dropped_at for t in attempts if t > dropped_at)
        assert len(offsets) == count
        # Full jitter over the first step (1 s): about 100 attempts per 100 ms, never all at once.
        buckets: dict[int, int] = {}
        for t in offsets:
            buckets[int(t * 10)] = buckets.get(int(t * 10), 0) + 1
        assert max(buckets.values()) <= 300
        assert offsets[-1] - offsets[0] >= 0.6
    finally:
        engine.shutdown(time.monotonic() + 5.0)

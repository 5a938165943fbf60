"""Fault injection against a real redis-server, with an oracle.

The oracle: every frame the simulator delivered to an open socket is in Redis exactly once,
in order (the simulator records each delivered payload, and each carries a unique sequence
number). Run alone with `pytest -m fault`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.daemon import Forwarder
from forwarder.errors import ExitCode
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET, ConfigFactory
from tests.helpers import RedisServer, free_port, wait_for, xrange
from tests.proxy import ReplyCuttingProxy

pytestmark = pytest.mark.fault

EVENT = "messages.upsert"
STREAM = f"main:{EVENT}"
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")
_PAUSE = threading.Event()


def pause(seconds: float) -> None:
    _PAUSE.wait(seconds)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test only, with AOF so a kill loses nothing on its side."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", *PERSISTENT)
    server.start()
    yield server
    server.stop()


def delivered(sim: Simulator) -> list[bytes]:
    return sim.delivered_frames("main", EVENT)


def in_redis(server: RedisServer) -> list[bytes]:
    client = server.client()
    try:
        return [fields[b"data"] for _, fields in xrange(client, STREAM)]
    finally:
        client.close()


def assert_exactly_once_in_order(got: list[bytes], want: list[bytes]) -> None:
    assert len(got) == len(set(got)), "duplicates in Redis"
    assert got == want


def traffic(sim: Simulator, rate: float) -> None:
    sim.set_rate(EVENT, rate, instance="main")


def settle(forwarder: Forwarder, sim: Simulator, timeout: float = 30.0) -> None:
    """Stop the traffic and wait until everything delivered has been confirmed by Redis."""
    traffic(sim, 0.0)
    stats = forwarder.stats[0]
    wait_for(lambda: stats.forwarded == len(delivered(sim)), timeout, "all frames confirmed")


def start(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    sim: Simulator,
    server_url: str,
    redis_extra: str = "socket_timeout = 1.0",
    spool_extra: str = "",
) -> Forwarder:
    config = make_config(
        {"main": [EVENT]},
        environ={"FORWARDER_REDIS_URL": server_url},
        redis_extra=redis_extra,
        spool_extra=spool_extra,
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: forwarder.stats[0].state.value == "connected", 10, "connected")
    return forwarder


def test_redis_killed_and_restarted_during_traffic(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    own_redis: RedisServer,
) -> None:
    """Redis dies (SIGKILL) and comes back: frames keep arriving, all land once, in order."""
    forwarder = start(make_config, run_forwarder, simulator, own_redis.url)
    traffic(simulator, 500)
    wait_for(lambda: forwarder.stats[0].forwarded > 100, 10, "traffic flowing")
    own_redis.stop()
    wait_for(lambda: forwarder.writer_stats.errors["connection"] > 0, 10, "the outage noticed")
    received = forwarder.stats[0].received
    wait_for(lambda: forwarder.stats[0].received > received + 300, 10, "reading on")
    assert forwarder.spool.pending()[0] > 0
    own_redis.start()
    settle(forwarder, simulator)
    assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))
    assert forwarder.spool.pending() == (0, 0)


def test_redis_paused_makes_writes_time_out_without_duplicates(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    own_redis: RedisServer,
) -> None:
    """SIGSTOP for 5 s: timed-out batches were maybe applied; the retry never duplicates."""
    forwarder = start(make_config, run_forwarder, simulator, own_redis.url)
    traffic(simulator, 500)
    wait_for(lambda: forwarder.stats[0].forwarded > 100, 10, "traffic flowing")
    own_redis.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: forwarder.writer_stats.errors["timeout"] > 0, 10, "a timeout")
        pause(5.0)
    finally:
        own_redis.signal(signal.SIGCONT)
    settle(forwarder, simulator)
    assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))


def test_redis_out_of_memory_keeps_frames_until_memory_is_back(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    own_redis: RedisServer,
) -> None:
    """OOM under maxmemory is transient: nothing dropped, everything written after the fix."""
    forwarder = start(make_config, run_forwarder, simulator, own_redis.url)
    admin = own_redis.client()
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(used + 200_000))
    traffic(simulator, 1000)
    wait_for(lambda: forwarder.writer_stats.errors["oom"] > 0, 15, "OOM errors")
    pause(0.5)
    admin.config_set("maxmemory", "0")
    settle(forwarder, simulator)
    assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))
    admin.close()


def test_readonly_replica_then_promotion(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    own_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """Pointed at a replica, writes fail READONLY and wait; after promotion all land once."""
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(own_redis.port))
    replica.start()
    try:
        forwarder = start(make_config, run_forwarder, simulator, replica.url)
        simulator.send("main", EVENT, 50)
        wait_for(lambda: forwarder.writer_stats.errors["readonly"] > 0, 10, "READONLY")
        assert forwarder.stats[0].forwarded == 0
        admin = replica.client()
        admin.replicaof("NO", "ONE")
        admin.close()
        simulator.send("main", EVENT, 50)
        settle(forwarder, simulator)
        assert_exactly_once_in_order(in_redis(replica), delivered(simulator))
    finally:
        replica.stop()


def test_lost_replies_are_not_written_twice(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    own_redis: RedisServer,
) -> None:
    """Redis applies a batch but its reply is cut: the re-sent batch adds nothing twice."""
    proxy = ReplyCuttingProxy(own_redis.port)
    proxy.start()
    try:
        forwarder = start(
            make_config, run_forwarder, simulator, f"redis://127.0.0.1:{proxy.port}/0"
        )
        for _ in range(3):
            proxy.cut_next_reply()
            simulator.send("main", EVENT, 200)
            wait_for(lambda: not proxy.armed, 10, "a reply cut")
        settle(forwarder, simulator)
        # Each cut reply was the array an applied batch returns, not an error like NOSCRIPT:
        # the frames were in Redis before the writer re-sent them.
        assert proxy.cuts == 3
        assert all(reply.startswith(b"*") for reply in proxy.cut_replies)
        assert forwarder.writer_stats.errors["connection"] >= 3
        assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))
        assert forwarder.stats[0].forwarded == len(delivered(simulator))
    finally:
        proxy.stop()


def test_a_full_spool_refuses_new_frames_and_keeps_the_old(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down and the spool at max_bytes: the oldest frames are kept, the rest counted."""
    (tmp_path / "late").mkdir()
    late = RedisServer(tmp_path / "late", *PERSISTENT)  # not started: Redis is down
    forwarder = start(
        make_config, run_forwarder, simulator, late.url, spool_extra="max_bytes = 1048576"
    )
    simulator.send("main", EVENT, 4000)  # ~2.5 MB of messages: more than the spool holds
    stats = forwarder.stats[0]
    wait_for(lambda: stats.received == 4000, 15, "all received")
    assert stats.dropped > 0
    assert "dropped" in caplog.text
    kept = stats.received - stats.dropped
    late.start()
    try:
        wait_for(lambda: stats.forwarded == kept, 30, "the spooled frames written")
        assert_exactly_once_in_order(in_redis(late), delivered(simulator)[:kept])
    finally:
        late.stop()


# -- the forwarder process itself dies or is stopped -------------------------------------------


def write_config(
    tmp_path: Path, sim: Simulator, redis_url: str, metrics_port: int | None = None
) -> Path:
    token = tmp_path / "token"
    token.write_text(mint_token("main", SECRET))
    path = tmp_path / "forwarder.toml"
    path.write_text(
        f"""shutdown_timeout = 5.0
[spool]
dir = "{tmp_path / "spool"}"
[redis]
url = "{redis_url}"
socket_timeout = 1.0
[metrics]
listen = "127.0.0.1:{metrics_port or free_port()}"
[[sources]]
name = "main"
url = "{sim.url}"
token_file = "{token}"
events = ["{EVENT}"]
stream = "{{source}}:{{event}}"
backoff = {{ initial = 0.05, maximum = 0.5 }}
"""
    )
    return path


def run(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "forwarder", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def open_connections(sim: Simulator) -> int:
    return int(sim.stats()["connections_open"])


def test_kill_9_mid_stream_then_restart_replays_the_spool_without_duplicates(
    tmp_path: Path, simulator: Simulator, own_redis: RedisServer
) -> None:
    """After kill -9 the spool is replayed; only frames still in the kernel can be missing."""
    config = write_config(tmp_path, simulator, own_redis.url)
    proc = run(config)
    try:
        wait_for(lambda: open_connections(simulator) == 1, 15, "connected")
        traffic(simulator, 1000)
        wait_for(lambda: len(in_redis(own_redis)) > 300, 15, "traffic flowing")
        proc.kill()
        proc.wait(5)
        # Until the simulator sees the dead socket close it keeps writing to it: those frames
        # belong to the first connection (the kernel's share, lost), not to the second.
        wait_for(lambda: open_connections(simulator) == 0, 10, "the old socket closed")
        first_connection = len(delivered(simulator))
        proc = run(config)
        # With nothing delivered to the new process the check below would be void.
        wait_for(lambda: len(delivered(simulator)) > first_connection + 50, 15, "reconnected")
        traffic(simulator, 0.0)
        everything = delivered(simulator)
        second = everything[first_connection:]
        wait_for(lambda: in_redis(own_redis)[-len(second) :] == second, 30, "all written")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    got = in_redis(own_redis)
    kept = len(got) - len(second)
    assert len(got) == len(set(got)), "duplicates in Redis"
    assert got == everything[:kept] + second
    # What the first process received was in its spool; only the socket buffer is lost.
    assert first_connection - kept < 500


def status(port: int) -> dict[str, Any]:
    """/status of a forwarder process, or {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except OSError:
        return {}


def spooled(port: int) -> int:
    return int(status(port).get("spool", {}).get("pending_messages", -1))


def test_kill_9_with_redis_down_replays_every_spooled_frame_exactly_once(
    tmp_path: Path, simulator: Simulator, own_redis: RedisServer
) -> None:
    """kill -9 while every frame waits for a down Redis: the next run writes each one once."""
    own_redis.stop()  # down from the start: nothing can leave the spool
    port = free_port()
    config = write_config(tmp_path, simulator, own_redis.url, metrics_port=port)
    proc = run(config)
    try:
        wait_for(lambda: open_connections(simulator) == 1, 15, "connected")
        assert simulator.send("main", EVENT, 500) == 500
        wait_for(lambda: spooled(port) == 500, 15, "500 frames spooled")
        proc.kill()  # no shutdown, no cursor saved, no fsync: only the kernel has them
        proc.wait(5)
        own_redis.start()
        proc = run(config)
        wait_for(lambda: open_connections(simulator) == 1, 15, "reconnected")
        assert simulator.send("main", EVENT, 100) == 100  # and the new run's own frames
        wait_for(lambda: len(in_redis(own_redis)) >= 600, 30, "spool replayed")
        wait_for(lambda: spooled(port) == 0, 15, "spool drained")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert len(delivered(simulator)) == 600
    assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))


def test_sigterm_with_redis_down_exits_0_and_delivers_after_restart(
    tmp_path: Path, simulator: Simulator, own_redis: RedisServer
) -> None:
    """SIGTERM during an outage: exit 0 in time, frames stay spooled and land after restart."""
    config = write_config(tmp_path, simulator, own_redis.url)
    proc = run(config)
    try:
        wait_for(lambda: open_connections(simulator) == 1, 15, "connected")
        simulator.send("main", EVENT, 300)
        wait_for(lambda: len(in_redis(own_redis)) == 300, 15, "first frames written")
        own_redis.stop()
        simulator.send("main", EVENT, 300)  # received, spooled, not written
        pause(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == ExitCode.OK
        own_redis.start()
        proc = run(config)
        wait_for(lambda: len(in_redis(own_redis)) == 600, 20, "spool replayed")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_during_a_long_outage(tmp_path: Path, simulator: Simulator) -> None:
    """With Redis down, 20 MB of frames go to disk: the process grows by far less than that."""
    config = write_config(tmp_path, simulator, f"redis://127.0.0.1:{free_port()}/0")
    config.write_text(config.read_text().replace("[redis]", "memory_bytes = 1048576\n[redis]", 1))
    proc = run(config)
    try:
        wait_for(lambda: open_connections(simulator) == 1, 15, "connected")
        simulator.send("main", EVENT, 2000)
        pause(0.5)
        before = rss_bytes(proc.pid)
        sent = 0
        while sent < 20_000_000:  # bounded: about 30,000 frames
            simulator.send("main", EVENT, 2000)
            sent = sum(len(f) for f in delivered(simulator))

        def spooled() -> int:
            return sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.seg"))

        wait_for(lambda: spooled() > sent, 30, "everything read and spooled")
        growth = rss_bytes(proc.pid) - before
        spool = spooled()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == ExitCode.OK
    assert spool > 20_000_000  # everything is on disk...
    assert growth < 12_000_000, f"RSS grew by {growth} bytes"  # ...not in memory

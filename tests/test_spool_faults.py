"""The spool's disk failing under a running forwarder, with the exact-once oracle.

A real 2 MiB filesystem (tmpfs) that fills up, the spool directory deleted while running, a
machine crash that loses the spool's tail (an older copy of the directory restored), and a
start on a full filesystem. The oracle is the simulator's record of every frame it delivered
to an open socket: each must be in Redis exactly once, in order, unless the spool counted it
(dropped while the disk and memory were both full, or lost with a deleted directory), and a
counted frame must really be missing. Run alone with `pytest -m fault`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from forwarder.config import Config, load_config
from forwarder.daemon import Forwarder
from forwarder.errors import ExitCode
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET
from tests.helpers import RedisServer, free_port, wait_for, xrange
from tests.tmpfs import fill_up, mounted_tmpfs

pytestmark = pytest.mark.fault

EVENT = "messages.upsert"
STREAM = f"main:{EVENT}"
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test only, with AOF so a stop loses nothing on its side."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", *PERSISTENT)
    server.start()
    yield server
    if server.proc is not None:
        server.signal(signal.SIGCONT)  # in case the test paused it
    server.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem, as in the issue's reproduction."""
    with mounted_tmpfs(tmp_path / "fs") as path:
        yield path


def write_config(
    tmp_path: Path, sim: Simulator, redis_url: str, spool_dir: Path, spool_extra: str = ""
) -> Path:
    token = tmp_path / "token"
    token.write_text(mint_token("main", SECRET))
    path = tmp_path / "forwarder.toml"
    path.write_text(
        f"""shutdown_timeout = 3.0
[spool]
dir = "{spool_dir}"
{spool_extra}
[redis]
url = "{redis_url}"
socket_timeout = 1.0
[metrics]
listen = "127.0.0.1:{free_port()}"
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


def config_for(path: Path) -> Config:
    return load_config(path, {})


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


def assert_all_but_one_gap(got: list[bytes], want: list[bytes], missing: int) -> int:
    """`got` is `want` with exactly `missing` consecutive frames taken out, once each.
    Returns the index in `want` of the last missing frame (-1: none)."""
    assert len(got) == len(set(got)), "duplicates in Redis"
    present = set(got)
    absent = [i for i, frame in enumerate(want) if frame not in present]
    assert len(absent) == missing, f"{len(absent)} frames missing, {missing} counted"
    assert absent == list(range(absent[0], absent[0] + missing)) if absent else True, (
        f"missing frames are not one run: {absent}"
    )
    assert got == [frame for frame in want if frame in present], "out of order"
    return absent[-1] if absent else -1


def connected(forwarder: Forwarder) -> None:
    wait_for(lambda: forwarder.stats[0].state.value == "connected", 15, "connected")


def metrics_text(forwarder: Forwarder) -> str:
    return generate_latest(forwarder.registry).decode()


def test_a_full_disk_with_redis_up_loses_nothing_and_recovers_by_itself(
    tmp_path: Path,
    simulator: Simulator,
    own_redis: RedisServer,
    small_fs: Path,
    run_forwarder: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk fills while Redis is up: frames still reach Redis (through memory, counted),
    an ERROR names the filesystem, and once space is freed the spool is writable and ready
    again without any traffic, with every frame in Redis exactly once."""
    config = config_for(write_config(tmp_path, simulator, own_redis.url, small_fs / "spool"))
    forwarder = run_forwarder(config)
    try:
        connected(forwarder)
        stats = forwarder.stats[0]
        simulator.send("main", EVENT, 100)
        wait_for(lambda: stats.forwarded == 100, 15, "the first frames written")
        wait_for(lambda: forwarder.ready()[0], 15, "ready")
        filler = fill_up(small_fs)
        simulator.send("main", EVENT, 400)  # about 1 MB: far more than the disk has left
        wait_for(lambda: stats.forwarded == 500, 20, "every frame written through memory")
        # (Whether the disk is still refusing now depends on what Redis' confirmations just
        # freed; the paused-Redis test below checks /readyz while it certainly is.)
        assert forwarder.spool.stats.memory_only > 0
        assert forwarder.spool.stats.write_errors > 0
        text = metrics_text(forwarder)
        assert "forwarder_spool_write_errors_total 0.0" not in text
        assert "forwarder_spool_memory_only_total 0.0" not in text
        assert f"mounted at {small_fs}" in caplog.text
        assert "No space left on device" in caplog.text
        filler.unlink()
        # No traffic needed: the spool probes the disk again by itself.
        wait_for(lambda: forwarder.spool.writable, 15, "the spool writable again")
        wait_for(lambda: forwarder.ready()[0], 15, "ready again")
        simulator.send("main", EVENT, 100)
        wait_for(lambda: stats.forwarded == 600, 15, "frames after the recovery written")
        assert stats.dropped == 0
        assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))
    finally:
        forwarder.shutdown()


@pytest.mark.slow
def test_a_full_disk_during_a_redis_pause_drops_only_while_full_and_recovers(
    tmp_path: Path,
    simulator: Simulator,
    own_redis: RedisServer,
    small_fs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's reproduction: 2 MiB disk, 600 frames/s, Redis paused. Frames are refused
    only once disk and memory are both full; after Redis drains, the disk is reclaimed and
    nothing more is dropped, also after a restart. Everything else is in Redis once."""
    path = write_config(
        tmp_path, simulator, own_redis.url, small_fs / "spool", "memory_bytes = 1048576"
    )
    forwarder = Forwarder(config_for(path))
    forwarder.start()
    try:
        connected(forwarder)
        spool, stats = forwarder.spool, forwarder.stats[0]
        simulator.set_rate(EVENT, 600.0, instance="main")
        wait_for(lambda: stats.forwarded > 300, 15, "traffic flowing")
        own_redis.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not spool.writable, 30, "the disk full")
            wait_for(lambda: spool.stats.dropped["write_error"] > 0, 30, "memory full too")
            ok, info = forwarder.ready()
            assert not ok
            assert not info["spool_ok"]  # the spool itself, not only the paused Redis
            assert "No space left on device" in info["spool_problem"]
            assert f"mounted at {small_fs}" in info["spool_problem"]
            assert "forwarder_spool_writable 0.0" in metrics_text(forwarder)
        finally:
            own_redis.signal(signal.SIGCONT)
        wait_for(lambda: spool.writable, 30, "the disk reclaimed once Redis drained it")
        recovered_at = len(delivered(simulator))
        dropped = stats.dropped
        received = stats.received
        wait_for(lambda: stats.received > received + 1200, 20, "two more seconds of traffic")
        assert stats.dropped == dropped  # nothing dropped once the disk had room again
        assert "buffer full" not in caplog.text
        assert "No space left on device" in caplog.text
        simulator.set_rate(EVENT, 0.0, instance="main")
        wait_for(lambda: spool.pending()[0] == 0, 30, "everything written")
        assert spool.stats.dropped["write_error"] == dropped
        text = metrics_text(forwarder)
        assert f'forwarder_spool_dropped_total{{reason="write_error"}} {dropped}.0' in text
        assert 'forwarder_spool_dropped_total{reason="max_bytes"} 0.0' in text
        last_missing = assert_all_but_one_gap(in_redis(own_redis), delivered(simulator), dropped)
        assert last_missing < recovered_at  # drops only while the disk was full
    finally:
        forwarder.shutdown()
    # And after a restart on the same (small) disk, nothing is dropped either.
    again = Forwarder(config_for(path))
    again.start()
    try:
        connected(again)
        before = len(delivered(simulator))
        simulator.send("main", EVENT, 300)
        wait_for(lambda: again.stats[0].forwarded == 300, 20, "frames after the restart")
        assert again.stats[0].dropped == 0
        assert in_redis(own_redis)[-300:] == delivered(simulator)[before:]
    finally:
        again.shutdown()


def test_the_spool_directory_deleted_while_running_keeps_what_memory_holds(
    tmp_path: Path,
    simulator: Simulator,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rm -rf of the spool during a Redis outage: noticed within seconds (ERROR, /readyz
    503), the directory recreated with every frame still in memory; the frames that were only
    on disk are counted lost; the stop claims exactly what the next start writes."""
    spool_dir = tmp_path / "spool"
    path = write_config(tmp_path, simulator, own_redis.url, spool_dir, "memory_bytes = 1048576")
    forwarder = Forwarder(config_for(path))
    forwarder.start()
    try:
        connected(forwarder)
        stats = forwarder.stats[0]
        simulator.send("main", EVENT, 100)
        wait_for(lambda: stats.forwarded == 100, 15, "the first frames written")
        own_redis.stop()
        # About 2.5 MB: the first 1 MiB stays in memory, the rest is on disk only.
        simulator.send("main", EVENT, 1000)
        wait_for(lambda: forwarder.spool.pending()[0] == 1000, 15, "spooled")
        # rm -rf, made atomic (moved away first) so the once-a-second check cannot meet a
        # half-deleted directory and race the test's own rmtree.
        spool_dir.rename(tmp_path / "trash")
        shutil.rmtree(tmp_path / "trash")
        wait_for(lambda: forwarder.spool.problem() is not None, 10, "the deletion noticed")
        ok, info = forwarder.ready()
        assert not ok
        assert "was deleted" in info["spool_problem"]
        assert spool_dir.is_dir()
        lost = forwarder.spool.stats.lost
        assert 0 < lost < 1000
        assert "are lost" in caplog.text
        simulator.send("main", EVENT, 50)  # after the recovery: into the new directory
        wait_for(lambda: forwarder.spool.pending()[0] == 1050 - lost, 15, "spooled")
    finally:
        forwarder.shutdown()
    claimed = f"stopped with {1050 - lost} frames in the spool"
    assert claimed in caplog.text
    own_redis.start()
    again = Forwarder(config_for(path))
    again.start()
    try:
        wait_for(lambda: len(in_redis(own_redis)) == 1150 - lost, 30, "the claimed frames")
        # The spool commits a batch after its XADD returned: the entries can be visible a moment
        # before the count drops, so wait for it rather than read it once.
        wait_for(lambda: again.spool.pending()[0] == 0, 10, "the spool committed")
    finally:
        again.shutdown()
    assert_all_but_one_gap(in_redis(own_redis), delivered(simulator), lost)


def run(config: Path, stderr: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "forwarder", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def open_connections(sim: Simulator) -> int:
    return int(sim.stats()["connections_open"])


def test_a_crash_that_loses_the_spool_tail_does_not_make_redis_skip_new_frames(
    tmp_path: Path, simulator: Simulator, own_redis: RedisServer
) -> None:
    """kill -9, then the spool directory as a machine crash can leave it (an older copy):
    the next run's frames all land in Redis, none twice."""
    spool_dir = tmp_path / "spool"
    config = write_config(tmp_path, simulator, own_redis.url, spool_dir)
    proc = run(config)
    try:
        wait_for(lambda: open_connections(simulator) == 1, 15, "connected")
        simulator.send("main", EVENT, 100)
        wait_for(lambda: len(in_redis(own_redis)) == 100, 15, "the first frames written")
        snapshot = tmp_path / "snapshot"
        shutil.copytree(spool_dir, snapshot)  # what the disk held at this moment
        simulator.send("main", EVENT, 100)
        wait_for(lambda: len(in_redis(own_redis)) == 200, 15, "the tail written")
        proc.kill()
        proc.wait(10)
        shutil.rmtree(spool_dir)
        shutil.copytree(snapshot, spool_dir)  # the power cut took the tail
        proc = run(config)
        wait_for(lambda: open_connections(simulator) == 1, 15, "reconnected")
        simulator.send("main", EVENT, 100)
        wait_for(lambda: len(in_redis(own_redis)) == 300, 15, "the new frames written")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert_exactly_once_in_order(in_redis(own_redis), delivered(simulator))


def test_starting_on_a_full_filesystem_exits_3_with_a_clear_message(
    tmp_path: Path, simulator: Simulator, small_fs: Path
) -> None:
    """No traceback and no restart-worthy exit 1: exit 3 (startup) naming the filesystem."""
    fill_up(small_fs)
    config = write_config(
        tmp_path, simulator, f"redis://127.0.0.1:{free_port()}/0", small_fs / "spool"
    )
    proc = run(config, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = err.decode()
    assert proc.returncode == ExitCode.STARTUP, text
    assert "Traceback" not in text
    assert "No space left on device" in text
    assert f"mounted at {small_fs}" in text

"""The `forwarder` command as a user runs it: exit codes, SIGTERM drain, secret hygiene."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import redis

from forwarder.errors import ExitCode
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET
from tests.helpers import RedisServer, free_port, wait_for, xrange


def write_config(tmp_path: Path, sim: Simulator, redis_url: str, events: list[str]) -> Path:
    token = tmp_path / "token"
    token.write_text(mint_token("main", SECRET))
    path = tmp_path / "forwarder.toml"
    names = ", ".join(f'"{e}"' for e in events)
    path.write_text(
        f"""
        shutdown_timeout = 8.0
        [spool]
        dir = "{tmp_path / "spool"}"
        [redis]
        url = "{redis_url}"
        [metrics]
        listen = "127.0.0.1:{free_port()}"
        [[sources]]
        name = "main"
        url = "{sim.url}"
        token_file = "{token}"
        events = [{names}]
        backoff = {{ initial = 0.05, maximum = 0.5, auth_initial = 0.1, auth_maximum = 1.0 }}
        """.replace("\n        ", "\n")
    )
    return path


def forwarder(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "forwarder", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def metrics_port(config: Path) -> int:
    for line in config.read_text().splitlines():
        if line.startswith("listen"):
            return int(line.split(":")[-1].strip('"'))
    raise AssertionError("no listen line")


def fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return str(r.read().decode())


def test_sigterm_drains_everything_received_and_exits_0(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """SIGTERM under steady traffic: exit 0 within 10 s, every delivered frame is in Redis."""
    config = write_config(tmp_path, simulator, redis_server.url, ["messages.upsert"])
    proc = forwarder("run", "--config", str(config))
    try:
        wait_for(lambda: simulator.stats()["connections_open"] == 1, 15, "connected")
        simulator.set_rate("messages.upsert", 3000.0)
        wait_for(lambda: redis_client.xlen("messages.upsert") > 1000, 15, "traffic flowing")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == ExitCode.OK
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        _, err = proc.communicate()
    simulator.set_rate("messages.upsert", 0.0)
    wait_for(lambda: simulator.stats()["connections_open"] == 0, 5, "socket closed")
    delivered = simulator.stats()["slots"]["main"]["messages.upsert"]["delivered"]
    frames = [f[b"data"] for _, f in xrange(redis_client, "messages.upsert")]
    assert frames == simulator.delivered_frames("main", "messages.upsert")
    assert len(frames) == delivered
    assert "stopped" in err


def test_second_signal_exits_at_once(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """With Redis unreachable the drain would wait; a second SIGTERM exits immediately."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path, simulator, nowhere, ["call.upsert"])
    proc = forwarder("run", "--config", str(config))
    try:
        wait_for(lambda: simulator.stats()["connections_open"] == 1, 15, "connected")
        simulator.send("main", "call.upsert", 5)  # pending: Redis is down
        proc.send_signal(signal.SIGTERM)
        threading.Event().wait(0.5)  # let the first signal start the drain
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == ExitCode.FORCED
        assert time.monotonic() - started < 2
    finally:
        proc.kill()
        proc.communicate()


def test_configuration_error_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    """A bad config is refused before anything starts, with exit code 2 (no restart loop)."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "x"\nurl = "ws://h/ws/events"\ntoken_env = "NOPE"\n')
    proc = forwarder("run", "--config", str(bad), env={"NOPE": ""})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.CONFIG
    assert "sources[0].token_env NOPE: the token is empty" in err
    proc = forwarder("check-config", "--config", str(tmp_path / "missing.toml"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.CONFIG
    assert "cannot read configuration" in err


def test_canary_token_never_appears_in_logs_metrics_status_or_check_config(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """A canary token stays out of stderr, /metrics, /status and check-config, even on 401s."""
    config = write_config(tmp_path, simulator, redis_server.url, ["messages.upsert", "call.upsert"])
    canary = mint_token("canary-instance-Zq9", SECRET)
    (tmp_path / "token").write_text(canary)
    simulator.reject(count=3, event="call.upsert")
    proc = forwarder("run", "--config", str(config), "--log-level", "DEBUG")
    port = metrics_port(config)
    try:
        wait_for(lambda: simulator.stats()["connections_open"] == 2, 30, "both connected")
        simulator.send("canary-instance-Zq9", "messages.upsert", 3)
        simulator.drop()
        wait_for(lambda: simulator.stats()["connections_open"] == 2, 15, "reconnected")
        exposed = fetch(port, "/metrics") + fetch(port, "/status")
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    finally:
        proc.kill()
        out, err = proc.communicate()
    check = subprocess.run(
        [sys.executable, "-m", "forwarder", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "HTTP 401" in err  # the failing handshakes were logged...
    assert "token=***" in err  # ...with the URL redacted
    for text in (err, out, exposed, check.stdout, check.stderr):
        assert canary not in text
        assert canary.split(".")[2] not in text  # not even the signature
    assert json.loads(check.stdout)["sources"][0]["token"].startswith("***")


def test_sighup_reloads_the_file_and_keeps_running(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """`systemctl reload` (SIGHUP) applies an added event without stopping the daemon."""
    config = write_config(tmp_path, simulator, redis_server.url, ["messages.upsert"])
    proc = forwarder("run", "--config", str(config))
    try:
        wait_for(lambda: simulator.stats()["connections_open"] == 1, 15, "connected")
        config.write_text(
            config.read_text().replace('"messages.upsert"', '"messages.upsert", "call.upsert"')
        )
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: simulator.stats()["connections_open"] == 2, 15, "the new subscription")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == ExitCode.OK
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "reloaded" in err


def test_watch_shows_each_subscription_with_its_counts_and_stream_length(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """`forwarder watch` (the live view of `make run`) prints a row per event with counts."""
    config = write_config(tmp_path, simulator, redis_server.url, ["messages.upsert", "call.upsert"])
    proc = forwarder("run", "--config", str(config))
    port = metrics_port(config)
    try:
        wait_for(lambda: simulator.stats()["connections_open"] == 2, 15, "connected")
        simulator.send("main", "messages.upsert", 7)
        wait_for(lambda: redis_client.xlen("messages.upsert") == 7, 15, "written")
        status_url = f"http://127.0.0.1:{port}/status"
        argv = ["watch", "--count", "1", "--status-url", status_url]
        watch = subprocess.run(
            [sys.executable, "-m", "forwarder", *argv, "--redis-url", redis_server.url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        proc.kill()
        proc.communicate()
    rows = {line.split()[0]: line.split() for line in watch.stdout.splitlines() if "/" in line}
    # SOURCE/EVENT STATE RECEIVED FORWARDED STREAM-LEN DLQ RECONN LAST
    assert rows["main/messages.upsert"][1:5] == ["connected", "7", "7", "7"]
    assert rows["main/call.upsert"][1:5] == ["connected", "0", "0", "0"]

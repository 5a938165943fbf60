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

import pytest
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


# -- bad flags and variables: exit 2 naming them, no traceback ---------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--log-level", "verbose"], "--log-level: expected DEBUG, INFO, WARNING or"),
        (["watch", "--interval", "0"], "--interval: expected a positive number of seconds"),
        (["watch", "--interval", "nan"], "--interval: expected a positive number of seconds"),
        (["watch", "--count", "-1"], "--count: expected a whole number, 0 or more"),
        (["watch", "--status-url", "localhost:9108/status"], "--status-url: expected http://"),
        (["watch", "--status-url", "http://127.0.0.1:99999/status"], "--status-url: expected"),
        (["watch", "--redis-url", "redis://127.0.0.1:99999/0"], "--redis-url: the URL: the port"),
    ],
)
def test_a_bad_flag_exits_2_naming_the_flag(argv: list[str], message: str) -> None:
    """Every flag is checked before use: a usage error naming it, exit 2, never a traceback."""
    argv = [sys.executable, "-m", "forwarder", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == ExitCode.CONFIG
    assert f"error: argument {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_bad_environment_variable_exits_2_naming_it(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer, command: str
) -> None:
    """FORWARDER_LOG_LEVEL=loud: a configuration error naming the variable, not a traceback."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    proc = forwarder(command, "--config", str(config), env={"FORWARDER_LOG_LEVEL": "loud"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.CONFIG
    assert "FORWARDER_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'" in err
    assert "Traceback" not in err
    assert simulator.stats()["connections_total"] == 0


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_port_out_of_range_is_a_configuration_error_for_both_commands(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer, command: str
) -> None:
    """ws://HOST:99999 fails check-config like run: exit 2 naming the key, before connecting."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    config.write_text(config.read_text().replace(simulator.url, "ws://127.0.0.1:99999/ws/events"))
    proc = forwarder(command, "--config", str(config))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.CONFIG
    assert "sources[0].url: the port must be a number from 1 to 65535, got '99999'" in err
    assert "Traceback" not in err


def test_check_config_prints_warnings_for_a_network_wide_metrics_port(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """listen = "0.0.0.0:…" is accepted, with a warning that /status is reachable from afar."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    config.write_text(config.read_text().replace('listen = "127.0.0.1:', 'listen = "0.0.0.0:'))
    proc = forwarder("check-config", "--config", str(config))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.OK
    assert "forwarder: warning: the metrics endpoint listens on '0.0.0.0:" in err
    assert "reachable from the network" in err


# -- signals during start-up ---------------------------------------------------------------

# Runs `forwarder` with the signals argv[1] (comma-separated numbers) sent to itself the
# moment load_config is entered: a deterministic stand-in for `systemctl stop`/`reload`
# arriving while it starts.
SIGNAL_WHILE_LOADING = """
import os, sys
import forwarder.config
real, fired = forwarder.config.load_config, []
def load_config(path, environ):
    if not fired:
        fired.append(True)
        for signum in sys.argv[1].split(","):
            os.kill(os.getpid(), int(signum))
    return real(path, environ)
forwarder.config.load_config = load_config
from forwarder.cli import main
sys.exit(main(sys.argv[2:]))
"""


def caught_signals(pid: int) -> int:
    """The SigCgt mask of a process: bit n-1 is set once it handles signal n."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigCgt line")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_starting_exits_0_without_connecting(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer, signum: int
) -> None:
    """SIGTERM/SIGINT while the configuration loads: exit 0, no traceback, no connection made."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    argv = [str(int(signum)), "run", "--config", str(config)]
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_LOADING, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert "stop requested while starting: exiting without connecting" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert simulator.stats()["connections_total"] == 0  # nobody's upstream slot was taken


def test_a_second_stop_signal_while_starting_exits_at_once(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """Two SIGTERMs while starting: the immediate exit (130) a second signal always means."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    twice = f"{int(signal.SIGTERM)},{int(signal.SIGTERM)}"
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_LOADING, twice, "run", "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitCode.FORCED, proc.stderr
    assert "second signal, exiting at once" in proc.stderr
    assert simulator.stats()["connections_total"] == 0


def test_a_sighup_while_starting_is_a_reload_once_running(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """SIGHUP while the configuration loads does not kill: the daemon starts, then reloads."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    hup = str(int(signal.SIGHUP))
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_WHILE_LOADING, hup, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("reloaded" in line for line in lines), 30, "the reload")
        wait_for(lambda: simulator.stats()["connections_open"] == 1, 30, "connected")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == ExitCode.OK
    finally:
        proc.kill()
        proc.wait()
        reader.join(10)
    assert not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_as_soon_as_the_process_can_catch_it_is_handled(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer, signum: int
) -> None:
    """The real command, signalled the moment /proc shows it catches the signal: SIGTERM
    exits 0 at once, SIGHUP leaves it running (and SIGTERM then stops it with 0)."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    proc = forwarder("run", "--config", str(config))
    try:
        # No fixed delay: poll until the handler exists (Python itself needs a few tens of
        # ms before any code of ours runs; no program can handle a signal before that).
        wait_for(lambda: caught_signals(proc.pid) >> (signum - 1) & 1, 30, "the handler")
        proc.send_signal(signum)
        if signum == signal.SIGHUP:
            wait_for(lambda: simulator.stats()["connections_open"] == 1, 30, "connected")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == ExitCode.OK
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "Traceback" not in err


def test_run_logs_the_warnings_of_the_configuration(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServer
) -> None:
    """`run` with listen = "0.0.0.0:…" logs a WARNING that the endpoint is network-wide."""
    config = write_config(tmp_path, simulator, redis_server.url, ["call.upsert"])
    config.write_text(config.read_text().replace('listen = "127.0.0.1:', 'listen = "0.0.0.0:'))
    # Stopped while starting (see above), so the port is never opened beyond loopback.
    argv = [str(int(signal.SIGTERM)), "run", "--config", str(config)]
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_LOADING, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert "WARNING forwarder: the metrics endpoint listens on '0.0.0.0:" in proc.stderr

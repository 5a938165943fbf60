"""Configuration loading: defaults, environment, and a precise error for every mistake."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from forwarder.config import load_config
from forwarder.errors import ConfigError
from forwarder.events import SENT_EVENTS

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJpbnN0YW5jZU5hbWUiOiJtYWluIn0.c2lnbmF0dXJl"


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "f.toml"
    path.write_text(body.replace("TOKEN_FILE", str(tmp_path / "token")))
    return path


SOURCE = """
[[sources]]
name = "main"
url = "ws://127.0.0.1:8084/ws/events"
token_file = "TOKEN_FILE"
"""


def test_defaults_subscribe_to_the_13_sent_events(tmp_path: Path) -> None:
    """Without `events`, a source subscribes to the 13 events the upstream really sends."""
    config = load_config(write(tmp_path, SOURCE), {})
    assert [s.event for s in config.subscriptions()] == list(SENT_EVENTS)
    assert len(SENT_EVENTS) == 13
    assert config.subscriptions()[0].stream == "qrcode.updated"
    assert config.subscriptions()[0].dead_letter_stream == "qrcode.updated:dlq"
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.metrics.listen == "127.0.0.1:9108"
    assert config.redis.maxlen is None


def test_token_file_is_read_again_on_each_call(tmp_path: Path) -> None:
    """A rotated token file is picked up by the next connection attempt."""
    config = load_config(write(tmp_path, SOURCE), {})
    other = TOKEN.replace("c2lnbmF0dXJl", "b3RoZXI")
    (tmp_path / "token").write_text(other)
    assert config.sources[0].token.read().reveal() == other


def test_environment_quick_start(tmp_path: Path) -> None:
    """FORWARDER_URL/TOKEN/EVENTS alone define a source named `default`."""
    env = {
        "FORWARDER_URL": "ws://10.0.0.1:8084/ws/events",
        "FORWARDER_TOKEN": TOKEN,
        "FORWARDER_EVENTS": "messages.upsert, connection.update",
        "FORWARDER_REDIS_URL": "redis://127.0.0.1:6380/2",
        "FORWARDER_METRICS_LISTEN": "127.0.0.1:9200",
    }
    config = load_config(None, env)
    assert [(s.source.name, s.event) for s in config.subscriptions()] == [
        ("default", "messages.upsert"),
        ("default", "connection.update"),
    ]
    assert config.redis.url == "redis://127.0.0.1:6380/2"
    assert config.metrics.port == 9200


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """FORWARDER_REDIS_URL wins over [redis] url; FORWARDER_CONFIG names the file."""
    path = write(tmp_path, '[redis]\nurl = "redis://a:6379/0"\n' + SOURCE)
    config = load_config(
        None, {"FORWARDER_CONFIG": str(path), "FORWARDER_REDIS_URL": "redis://b/1"}
    )
    assert config.redis.url == "redis://b/1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (SOURCE + 'events = ["messaging-history.set"]\n', "Baileys event name"),
        (SOURCE + 'events = ["nope.event"]\n', "unknown event 'nope.event'"),
        (SOURCE + 'events = ["call.upsert", "call.upsert"]\n', "listed twice"),
        (SOURCE + 'stream = "{instance}"\n', "unknown placeholder {instance}"),
        (SOURCE + "ping_interval = -1\n", "ping_interval must be at least"),
        (SOURCE + 'colour = "blue"\n', "unknown key 'sources[0].colour'"),
        (SOURCE.replace("ws://", "http://"), "expected a ws:// or wss:// URL"),
        (SOURCE.replace("/ws/events", "/ws/events?token=abc"), "put no query in the URL"),
        (SOURCE + SOURCE, "the name 'main' is used twice"),
        (
            SOURCE + 'stream = "{event}:dlq"\n' + SOURCE.replace('"main"', '"other"'),
            "stream key 'qrcode.updated:dlq' is the dead-letter stream of source 'other'",
        ),
        ("[redis]\nurl = 'http://x'\n" + SOURCE, "redis.url: expected redis://"),
        ("[metrics]\nlisten = 'nowhere'\n" + SOURCE, "metrics.listen: expected HOST:PORT"),
        ("[redis]\nmaxlen = 0\n" + SOURCE, "redis.maxlen must be at least 1"),
        ("", "no sources configured"),
        ("this is = = not toml", "invalid TOML"),
    ],
)
def test_invalid_configurations_are_refused_with_a_precise_message(
    tmp_path: Path, body: str, message: str
) -> None:
    """Each mistake gets a ConfigError naming the key and the reason."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), {})
    assert message in str(info.value)


def test_missing_token_file_is_refused_without_leaking(tmp_path: Path) -> None:
    """An unreadable token file is a config error naming the file, not the token."""
    path = write(tmp_path, SOURCE)
    (tmp_path / "token").unlink()
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_config(path, {})


def test_token_that_is_not_a_jwt_is_refused(tmp_path: Path) -> None:
    """The upstream only accepts JWTs; anything else fails at start, not with 401 storms."""
    path = write(tmp_path, SOURCE)
    (tmp_path / "token").write_text("not-a-jwt")
    with pytest.raises(ConfigError, match="not a JWT") as info:
        load_config(path, {})
    assert "not-a-jwt" not in str(info.value)


def test_redacted_view_hides_every_secret(tmp_path: Path) -> None:
    """check-config's view has no token and no Redis password."""
    path = write(tmp_path, '[redis]\nurl = "redis://user:hunter2@h:6379/0"\n' + SOURCE)
    text = repr(load_config(path, {}).redacted()) + repr(load_config(path, {}))
    assert TOKEN not in text
    assert "hunter2" not in text


def test_metrics_detail_source_label_and_stall_thresholds(tmp_path: Path) -> None:
    """[metrics] detail, source_label and stall_after: defaults, overrides merged per event."""
    default = load_config(write(tmp_path, SOURCE), {}).metrics
    assert (default.detail, default.source_label) == ("event", "auto")
    stall = dict(default.stall_after)
    assert (stall["default"], stall["messages.upsert"], stall["call.upsert"]) == (3600, 900, 0)
    body = (
        '[metrics]\ndetail = "subscription"\nsource_label = "never"\n'
        '[metrics.stall_after]\ndefault = 600\n"call.upsert" = 7200\n' + SOURCE
    )
    metrics = load_config(write(tmp_path, body), {}).metrics
    assert (metrics.detail, metrics.source_label) == ("subscription", "never")
    stall = dict(metrics.stall_after)
    assert (stall["default"], stall["messages.upsert"], stall["call.upsert"]) == (600, 900, 7200)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[metrics]\ndetail = "source"\n', "metrics.detail: expected 'event' or 'subscription'"),
        ("[metrics]\nsource_label = true\n", "metrics.source_label must be a string"),
        ('[metrics]\nsource_label = "yes"\n', "expected 'auto', 'always' or 'never'"),
        ('[metrics.stall_after]\n"message.upsert" = 60\n', "metrics.stall_after.message.upsert"),
        ("[metrics.stall_after]\ndefault = -1\n", "metrics.stall_after.default must be at least"),
    ],
)
def test_bad_metrics_settings_are_refused(tmp_path: Path, body: str, message: str) -> None:
    """A typo in [metrics] is a ConfigError naming the key, not a silent default."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body + SOURCE), {})
    assert message in str(info.value)


def outcome_within(call: Callable[[], object], fifo_dir: Path, seconds: float = 10.0) -> object:
    """Run `call` in a thread: what it returned or raised; fail the test if it is still blocked
    after `seconds` (then release it by opening the FIFOs in `fifo_dir` for writing)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for path in fifo_dir.iterdir():  # a blocked reader sees EOF once a writer came and went
            if stat.S_ISFIFO(path.stat().st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        raise AssertionError(f"still blocked after {seconds} s")
    return outcome[0]


@pytest.mark.parametrize(
    ("setting", "extra", "message"),
    [
        ("config", "", "FIFO: cannot read configuration: "),
        ("token_file", "", "sources[0].token_file TOKEN: cannot read token file: "),
        ("ca_file", 'ca_file = "FIFO"\n', "sources[0].ca_file: cannot read FIFO: "),
        ("client_cert", 'client_cert = "FIFO"\n', "sources[0].client_cert: cannot read FIFO: "),
    ],
)
def test_a_named_pipe_is_refused_at_once_wherever_a_file_is_expected(
    tmp_path: Path, setting: str, extra: str, message: str
) -> None:
    """A FIFO as configuration, token or TLS file is a config error naming it, never a hang."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = write(tmp_path, SOURCE.replace("ws://", "wss://") + extra.replace("FIFO", str(fifo)))
    token = tmp_path / "token"
    if setting == "token_file":
        token.unlink()
        os.mkfifo(token)
    if setting == "config":
        path = fifo
    error = outcome_within(lambda: load_config(path, {}), tmp_path)
    assert isinstance(error, ConfigError)
    expected = message.replace("FIFO", str(fifo)).replace("TOKEN", str(token))
    assert str(error) == expected + "not a regular file (a named pipe)"


def test_a_token_file_that_becomes_a_pipe_fails_the_next_read_without_blocking(
    tmp_path: Path,
) -> None:
    """The token is re-read before every connection: a FIFO then fails that attempt at once."""
    config = load_config(write(tmp_path, SOURCE), {})
    (tmp_path / "token").unlink()
    os.mkfifo(tmp_path / "token")
    error = outcome_within(config.sources[0].token.read, tmp_path)
    assert isinstance(error, ConfigError)
    assert "cannot read token file: not a regular file (a named pipe)" in str(error)


WS = "ws://127.0.0.1:8084/ws/events"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FORWARDER_URL", "ws://127.0.0.1:99999/ws/events", "the port must be a number"),
        ("FORWARDER_URL", "ws://127.0.0.1:8084/ws/events#x", "remove the '#' part"),
        ("FORWARDER_TOKEN", "not-a-jwt", "the token is not a JWT"),
        ("FORWARDER_EVENTS", "messages.upsert,bogus", "unknown event 'bogus'"),
        ("FORWARDER_REDIS_URL", "redis://127.0.0.1:99999/0", "the port must be a number"),
        ("FORWARDER_REDIS_URL", "http://127.0.0.1/0", "expected redis://"),
        ("FORWARDER_METRICS_LISTEN", "127.0.0.1:99999", "port 99999 is out of range"),
        ("FORWARDER_LOG_LEVEL", "loud", "expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'"),
        ("FORWARDER_CONFIG", "/nonexistent/forwarder.toml", "cannot read configuration"),
        ("FORWARDER_SPOOL_DIR", "TOKEN_FILE", "exists and is not a directory"),
    ],
)
def test_a_bad_environment_variable_is_named_in_the_error(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """Each FORWARDER_* variable is checked like the key it overrides, under its own name."""
    write(tmp_path, "")
    env = {"FORWARDER_URL": WS, "FORWARDER_TOKEN": TOKEN}
    env[variable] = value.replace("TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    assert str(info.value).startswith(variable)
    assert message in str(info.value)


def test_a_network_wide_metrics_listen_and_an_odd_path_are_warned_about(tmp_path: Path) -> None:
    """0.0.0.0 is allowed but warned about (it exposes /status); so is a path not /ws/events."""
    body = '[metrics]\nlisten = "0.0.0.0:9108"\n' + SOURCE.replace("/ws/events", "/events/")
    warnings = load_config(write(tmp_path, body), {}).warnings()
    assert len(warnings) == 2
    assert "'0.0.0.0:9108'" in warnings[0]
    assert "reachable from the network" in warnings[0]
    assert "the URL's path is '/events/'" in warnings[1]
    assert load_config(write(tmp_path, SOURCE), {}).warnings() == []

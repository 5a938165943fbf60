"""Address checks: every part of source URLs, the Redis URL and metrics.listen, at load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forwarder.addresses import is_loopback, split_listen
from forwarder.config import load_config
from forwarder.errors import ConfigError
from tests.test_config import SOURCE, write

WS = "ws://127.0.0.1:8084/ws/events"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "ws://127.0.0.1:99999/ws/events",
            "the port must be a number from 1 to 65535, got '99999'",
        ),
        ("ws://127.0.0.1:0/ws/events", "the port must be a number from 1 to 65535, got '0'"),
        ("ws://127.0.0.1:http/ws/events", "the port must be a number from 1 to 65535, got 'http'"),
        ("ws://127.0.0.1:/ws/events", "the port must be a number from 1 to 65535, got ''"),
        ("ws://[::1/ws/events", "not a valid URL"),
        ("ws://exa mple:8084/ws/events", "'exa mple' is not a host name or IP address"),
        ("ws://bücher.example/ws/events", "a non-ASCII name in its xn-- form"),
        ("ws:///ws/events", "the URL has no host"),
        ("ws://127.0.0.1:8084", "the URL has no path; the upstream serves the event feed at"),
        ("ws://127.0.0.1:8084/ws/events#main", "remove the '#' part: forwarder appends"),
        ("ws://127.0.0.1:8084/ws/events?", "put no query in the URL"),
        ("ws://me:hunter2@127.0.0.1:8084/ws/events", "remove the 'user@' part"),
    ],
)
def test_every_part_of_a_source_url_is_checked_at_load(
    tmp_path: Path, url: str, message: str
) -> None:
    """Port, host, path, fragment, query and user info: a ConfigError naming the key, no secret."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, SOURCE.replace(WS, url)), {})
    assert str(info.value).startswith("sources[0].url: ")
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:99999/0", "the port must be a number from 1 to 65535, got '99999'"),
        ("redis://:hunter2@127.0.0.1:0/0", "the port must be a number from 1 to 65535, got '0'"),
        ("redis://127.0.0.1:6379/zero", "the path is the database number"),
        ("redis://127.0.0.1:6379/0?db=x", "db must be a database number"),
        ("redis://127.0.0.1:6379/0?socket_timeout=1", "unknown option 'socket_timeout'"),
        ("redis://:hun#ter2@127.0.0.1/0", "in a password write # as %23"),
        ("redis:///0", "the URL has no host"),
        ("unix://", "a unix:// URL needs the socket's path"),
    ],
)
def test_every_part_of_the_redis_url_is_checked_at_load(
    tmp_path: Path, url: str, message: str
) -> None:
    """A Redis URL redis-py would reject later (or misread) is refused now, without its password."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f'[redis]\nurl = "{url}"\n' + SOURCE), {})
    assert str(info.value).startswith("redis.url: ")
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_good_urls_and_listen_addresses_are_accepted(tmp_path: Path) -> None:
    """IPv6 literals, names with underscores, default ports, unix sockets and port 0 load."""
    for url, redis_url, listen in [
        ("ws://[::1]:8084/ws/events", "redis://u:p@[::1]:6380/3", "[::1]:0"),
        ("wss://whatsapp_api/ws/events", "rediss://redis.internal/", "localhost:9108"),
        ("ws://api.example.com./ws/events", "unix:///run/redis.sock?db=2", "127.0.0.1:9108"),
    ]:
        body = f'[redis]\nurl = "{redis_url}"\n[metrics]\nlisten = "{listen}"\n' + SOURCE
        config = load_config(write(tmp_path, body.replace(WS, url)), {})
        assert config.sources[0].url == url
        assert config.redis.url == redis_url


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("127.0.0.1:99999", "metrics.listen: port 99999 is out of range"),
        ("127.0.0.1:", "metrics.listen: expected HOST:PORT"),
        ("::1:9108", "an IPv6 address goes in brackets"),
        ("exa mple:9108", "'exa mple' is not a host name or IP address"),
    ],
)
def test_metrics_listen_is_checked_at_load(tmp_path: Path, listen: str, message: str) -> None:
    """HOST:PORT with a real host and a port up to 65535 (0: any free port)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n' + SOURCE), {})


def test_loopback_is_told_apart_from_the_network() -> None:
    """127.0.0.0/8, ::1 and localhost keep the port local; 0.0.0.0, :: and names do not."""
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost"))
    everywhere = "0.0.0.0"  # noqa: S104 - the value under test, nothing is bound
    assert not any(is_loopback(h) for h in (everywhere, "::", "192.0.2.1", "metrics.example"))
    assert split_listen("[::1]:9108") == ("::1", 9108)
    assert split_listen(":9108") == ("127.0.0.1", 9108)

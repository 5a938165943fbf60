"""`forwarder fleet status` and `forwarder fleet drain` against real members on a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from forwarder.cli import main
from forwarder.config import Config, load_config
from forwarder.errors import ExitCode
from forwarder.fleet.keys import FleetKeys
from forwarder.fleet.member import FleetMember
from forwarder.fleet.runner import FleetThread
from forwarder.fleet.store import RedisFleetStore, fleet_client
from tests.fleet_harness import Obedient, Upstream
from tests.helpers import RedisServer, wait_for

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJpbnN0YW5jZU5hbWUiOiJtYWluIn0.c2lnbmF0dXJl"


def write_config(tmp_path: Path, redis_url: str, fleet: str = "") -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "forwarder.toml"
    path.write_text(
        f"""
[redis]
url = "{redis_url}"
socket_timeout = 1.0
[[sources]]
name = "main"
url = "ws://127.0.0.1:1/ws/events"
token_file = "{tmp_path / "token"}"
events = ["messages.upsert", "call.upsert", "connection.update", "qrcode.updated"]
[fleet]
enabled = true
lease_ttl = 2.0
renew_interval = 0.4
margin = 0.5
{fleet}
"""
    )
    return path


@pytest.fixture
def config_path(tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis) -> Path:
    """A configuration on the test Redis, with the group's epoch an hour old (no quiet)."""
    path = write_config(tmp_path, redis_server.url)
    seconds, _ = redis_client.time()
    redis_client.set(FleetKeys("default").epoch, (int(seconds) - 3600) * 1000)
    return path


@pytest.fixture
def start_member(config_path: Path) -> Iterator[Callable[[str], FleetThread]]:
    threads: list[FleetThread] = []
    clients: list[redis.Redis] = []
    upstream = Upstream()

    def start(name: str) -> FleetThread:
        config: Config = load_config(config_path, {})
        member = FleetMember(config.fleet, name=name)
        member.set_candidates(sub.key for sub in config.subscriptions())
        client = fleet_client(config.redis, config.fleet)
        clients.append(client)
        daemon = Obedient(member, upstream)  # connects successors, reports back
        thread = FleetThread(member, RedisFleetStore(client, config.fleet), daemon.apply)
        thread.start()
        threads.append(thread)
        return thread

    yield start
    for thread in threads:
        thread.stop()
        thread.join(5)
    for client in clients:
        client.close()


def test_status_prints_members_and_every_subscription_owner(
    config_path: Path,
    start_member: Callable[[str], FleetThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The table names each live member, and each configured subscription's owner."""
    a = start_member("fw-a")
    b = start_member("fw-b")
    wait_for(lambda: len(a.member.leases()) + len(b.member.leases()) == 4, 20, "all owned")
    assert main(["fleet", "status", "--config", str(config_path)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "fw-a" in out
    assert "fw-b" in out
    assert "main/messages.upsert" in out
    assert "4 subscriptions: 4 owned, 0 without an owner" in out
    assert main(["fleet", "status", "--config", str(config_path), "--json"]) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in report["members"]] == ["fw-a", "fw-b"]
    assert {m["state"] for m in report["members"]} == {"live"}
    owners = {s["subscription"]: s["owner"] for s in report["subscriptions"]}
    assert set(owners.values()) <= {"fw-a", "fw-b"}
    for name, thread in (("fw-a", a), ("fw-b", b)):
        held = {f"{k[0]}/{k[1]}" for k in thread.member.leases()}
        assert {s for s, o in owners.items() if o == name} == held


def test_status_shows_subscriptions_nobody_owns(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no member running, every configured subscription is listed without an owner."""
    assert main(["fleet", "status", "--config", str(config_path)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "(no member has joined)" in out
    assert out.count("(no owner)") == 4
    assert "4 subscriptions: 0 owned, 4 without an owner" in out


def test_drain_moves_everything_to_the_other_member(
    config_path: Path,
    start_member: Callable[[str], FleetThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`fleet drain --member A --wait`: A hands all over and takes nothing new; --cancel
    lets it take subscriptions again."""
    a = start_member("fw-a")
    b = start_member("fw-b")
    # Both with their share: while fw-b briefly holds all 4, fw-a would have nothing to hand
    # over and the drain would return before fw-a has even seen it.
    wait_for(
        lambda: (
            len(a.member.leases()) + len(b.member.leases()) == 4
            and bool(a.member.leases())
            and bool(b.member.leases())
        ),
        20,
        "all owned, each member holding some",
    )
    argv = ["fleet", "drain", "--config", str(config_path), "--member", "fw-a", "--wait", "20"]
    assert main(argv) == ExitCode.OK
    assert "fw-a owns no subscription any more" in capsys.readouterr().out
    wait_for(lambda: len(b.member.leases()) == 4, 5, "fw-b promoted at its next renewal")
    assert a.member.status()["draining"] == "drain"
    main(["fleet", "status", "--config", str(config_path), "--json"])
    states = {m["name"]: m["state"] for m in json.loads(capsys.readouterr().out)["members"]}
    assert states == {"fw-a": "draining", "fw-b": "live"}
    argv = ["fleet", "drain", "--config", str(config_path), "--member", "fw-a", "--cancel"]
    assert main(argv) == ExitCode.OK
    wait_for(lambda: a.member.status()["draining"] is None, 10, "drain withdrawn")
    wait_for(a.member.leases, 20, "fw-a takes its share again")


def test_drain_needs_a_live_member_name(
    config_path: Path,
    start_member: Callable[[str], FleetThread],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown name, or two members on this host and no --member: exit 2, with the
    live members listed."""
    start_member("fw-a")
    start_member("fw-b")
    wait_for(
        lambda: (
            main(["fleet", "status", "--config", str(config_path)]) == 0
            and "fw-b" in capsys.readouterr().out
        ),
        10,
        "both joined",
    )
    code = main(["fleet", "drain", "--config", str(config_path), "--member", "nope"])
    assert code == ExitCode.CONFIG
    assert "no live member is named 'nope' (live members: fw-a, fw-b)" in capsys.readouterr().err
    assert main(["fleet", "drain", "--config", str(config_path)]) == ExitCode.CONFIG
    assert "say which member with --member NAME" in capsys.readouterr().err


def test_an_unreachable_redis_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis down: exit 1 and one line naming the problem, no traceback, no password."""
    path = write_config(tmp_path, "redis://:hunter2@127.0.0.1:1/0")
    started = time.monotonic()
    assert main(["fleet", "status", "--config", str(path)]) == ExitCode.FAILURE
    err = capsys.readouterr().err
    assert err.startswith("forwarder fleet: cannot read the fleet from Redis:")
    assert "Traceback" not in err
    assert "hunter2" not in err
    assert time.monotonic() - started < 10


def test_a_bad_configuration_is_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A [fleet] mistake stops `fleet status` like any configuration error."""
    path = write_config(tmp_path, "redis://127.0.0.1:1/0", fleet="max_handovers = 0")
    assert main(["fleet", "status", "--config", str(path)]) == ExitCode.CONFIG
    assert "fleet.max_handovers must be at least 1" in capsys.readouterr().err

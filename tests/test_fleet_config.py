"""The [fleet] table: defaults, the default member name, and an error for each mistake."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from forwarder.config import load_config
from forwarder.errors import ConfigError
from forwarder.fleet.config import FleetConfig, default_member_name

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJpbnN0YW5jZU5hbWUiOiJtYWluIn0.c2lnbmF0dXJl"
SOURCE = """
[[sources]]
name = "main"
url = "ws://127.0.0.1:8084/ws/events"
token_file = "TOKEN_FILE"
"""


def load(tmp_path: Path, fleet: str) -> FleetConfig:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "f.toml"
    path.write_text((SOURCE + fleet).replace("TOKEN_FILE", str(tmp_path / "token")))
    return load_config(path, {}).fleet


def test_fleet_mode_is_off_by_default_with_a_ten_second_lease(tmp_path: Path) -> None:
    """No [fleet] table: disabled; the defaults are lease_ttl 10 s, renew every 10/3 s."""
    fleet = load(tmp_path, "")
    assert fleet == FleetConfig()
    assert not fleet.enabled
    assert fleet.lease_ttl == 10.0
    assert fleet.renew_interval == pytest.approx(10 / 3)
    assert fleet.margin == 2.0


def test_the_times_follow_lease_ttl_unless_set(tmp_path: Path) -> None:
    """renew_interval and margin default to a third and a fifth of the lease_ttl."""
    fleet = load(tmp_path, '[fleet]\nenabled = true\nname = "fw-1"\ngroup = "eu"\nlease_ttl = 30\n')
    assert fleet.enabled
    assert fleet.member_name() == "fw-1"
    assert fleet.group == "eu"
    assert fleet.renew_interval == 10.0
    assert fleet.margin == 6.0


def test_the_default_name_is_hostname_and_pid() -> None:
    """Unset name: `hostname-pid`, cleaned into the allowed characters."""
    assert FleetConfig().member_name() == f"{default_member_name(socket.gethostname())}"
    assert FleetConfig().member_name().endswith(f"-{os.getpid()}")
    assert default_member_name("web 1.example.com", 42) == "web-1.example.com-42"
    assert default_member_name("", 7) == "host-7"


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        ("enabled = 1", "fleet.enabled must be true or false"),
        ('name = "two words"', "fleet.name: 'two words' must be 1-64 characters"),
        ('group = "{x}"', "fleet.group: '{x}' must be 1-64 characters"),
        ("lease_ttl = 0.5", "fleet.lease_ttl must be at least 1.0"),
        ("lease_ttl = 10\nrenew_interval = 6\nmargin = 5", "must be less than fleet.lease_ttl"),
        ("max_handovers = 0", "fleet.max_handovers must be at least 1"),
        ("leasettl = 10", "unknown key 'fleet.leasettl'"),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, fleet: str, message: str) -> None:
    """A bad [fleet] value is a ConfigError that names the key and the reason."""
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load(tmp_path, "[fleet]\n" + fleet + "\n")


def test_check_config_shows_the_fleet_settings(tmp_path: Path) -> None:
    """`forwarder check-config` (redacted()) includes the [fleet] table."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "f.toml"
    path.write_text(
        (SOURCE + "[fleet]\nenabled = true\n").replace("TOKEN_FILE", str(tmp_path / "token"))
    )
    shown = load_config(path, {}).redacted()["fleet"]
    assert shown["enabled"] is True
    assert shown["lease_ttl"] == 10.0
    assert shown["name"] is None


def test_the_environment_names_the_member(tmp_path: Path) -> None:
    """FORWARDER_FLEET_NAME (e.g. %H in the unit) wins over [fleet] name; bad ones fail."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "f.toml"
    path.write_text(
        (SOURCE + '[fleet]\nname = "file"\n').replace("TOKEN_FILE", str(tmp_path / "token"))
    )
    assert load_config(path, {"FORWARDER_FLEET_NAME": "host-b"}).fleet.member_name() == "host-b"
    with pytest.raises(ConfigError, match="FORWARDER_FLEET_NAME: 'a b' must be"):
        load_config(path, {"FORWARDER_FLEET_NAME": "a b"})

"""The fleet's alert rules (deploy/prometheus/forwarder-fleet-rules.yml), checked with the
real promtool, and held against the metrics FleetCollector really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from forwarder.fleet.metrics import FleetCollector
from tests.fleet_harness import World

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "forwarder-fleet-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "forwarder-fleet-rules.test.yml"


def promtool(*args: str) -> tuple[int, str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (`make test` installs it; Debian: prometheus)")
    proc = subprocess.run(
        [path, *args],
        cwd=RULES.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout


def test_fleet_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the fleet rules (syntax, PromQL, templates)."""
    code, out = promtool("check", "rules", RULES.name)
    assert code == 0, out
    assert "SUCCESS" in out


def test_fleet_rule_unit_tests_pass() -> None:
    """`promtool test rules`: each fleet alert fires when it should and stays quiet otherwise."""
    code, out = promtool("test", "rules", RULE_TESTS.name)
    assert code == 0, out
    assert "SUCCESS" in out


def test_every_fleet_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case expecting it and a case expecting nothing; each has severity,
    summary and description."""
    text = RULES.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", text, re.MULTILINE)
    assert {"ForwarderFleetSubscriptionUnowned", "ForwarderFleetMembersDisagree"} <= set(alerts)
    fires: set[str] = set()
    quiet: set[str] = set()
    cases = re.split(r"^\s*- (?=alertname:|name:)", RULE_TESTS.read_text(), flags=re.MULTILINE)
    for case in cases:
        match = re.match(r"alertname: (\w+)", case)
        if match:
            (fires if "exp_labels:" in case else quiet).add(match.group(1))
    assert set(alerts) == fires == quiet
    for block in re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]:
        assert re.search(r"severity: (critical|warning)\b", block), block.split()[0]
        assert "summary:" in block
        assert "description:" in block


def test_the_rules_use_only_metrics_the_collector_exports() -> None:
    """No fleet alert reads a metric FleetCollector does not export (a typo stays silent)."""
    world = World()
    world.add("a", [("main", "messages.upsert")])
    registry = CollectorRegistry()
    registry.register(FleetCollector(world.members["a"]))
    exported = set(re.findall(r"^(forwarder_\w+)", generate_latest(registry).decode(), re.M))
    body = "\n".join(
        line for line in RULES.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    used = set(re.findall(r"\bforwarder_[a-z_]+\b", body))
    assert used
    assert used <= exported, used - exported

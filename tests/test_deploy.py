"""Deployment files: alert rules, dashboard, systemd unit, example config, install scripts.

They are checked with the real tools (promtool, systemd-analyze, make, pip); a missing tool
fails the test with what to install, never skips it: `make test` installs them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import load_config
from forwarder.daemon import Forwarder
from forwarder_sim import mint_token
from tests.conftest import SECRET, ConfigFactory

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "forwarder-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "forwarder-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "forwarder-dashboard.json"
UNIT = ROOT / "systemd" / "forwarder.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "forwarder.toml"
# The console script of this checkout's virtualenv (what `make install-dev` created).
VENV_FORWARDER = Path(sys.executable).parent / "forwarder"
MAX_EXPOSURE = 2.0

# Metrics the rules or the dashboard use before forwarder exports them. Each entry must be
# referenced and not yet exported (test_planned_metrics_are_still_planned), so the list
# shrinks as the work lands. Empty: everything referenced is exported today.
PLANNED_METRICS: dict[str, str] = {}
# Prometheus' own series, not forwarder's.
PROMETHEUS_METRICS = {"up"}

_METRIC_RE = re.compile(r"\b(?:forwarder|process)_[a-z0-9_]+\b")


def tool(name: str, package: str) -> str:
    """Path of a required program; fails (never skips) the test when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: these tests need the real one "
            f"(`make test` installs it; Debian/Ubuntu: apt-get install {package})"
        )
    return path


def run(argv: list[str], cwd: Path | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """Run a command; returns (exit code, stdout and stderr together)."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout


# -- Prometheus rules -------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the rules file (syntax, PromQL, templates, lint)."""
    promtool = tool("promtool", "prometheus")
    code, out = run([promtool, "check", "rules", str(RULES)])
    assert code == 0, out
    assert "SUCCESS" in out


def test_alert_rule_unit_tests_pass() -> None:
    """`promtool test rules` passes: each alert fires and stays quiet when it should."""
    promtool = tool("promtool", "prometheus")
    code, out = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert code == 0, out
    assert "SUCCESS" in out


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert has a rule-test case that expects it and one that expects nothing."""
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)
    assert len(alerts) == len(set(alerts)) >= 10
    fires: set[str] = set()
    quiet: set[str] = set()
    # A case runs from "- alertname: X" to the next case or test; it expects alerts
    # exactly when it has an exp_alerts list.
    cases = re.split(r"^\s*- (?=alertname:|name:)", RULE_TESTS.read_text(), flags=re.MULTILINE)
    for case in cases:
        match = re.match(r"alertname: (\w+)", case)
        if match:
            (fires if "exp_labels:" in case else quiet).add(match.group(1))
    assert set(alerts) - fires == set(), "alerts never shown firing"
    assert set(alerts) - quiet == set(), "alerts never shown quiet"
    assert (fires | quiet) <= set(alerts), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_summary_and_description() -> None:
    """Routing and the notification text need severity, summary and description on each."""
    blocks = re.split(r"^\s*- alert: ", RULES.read_text(), flags=re.MULTILINE)[1:]
    assert blocks
    for block in blocks:
        name = block.split()[0]
        body = block.split("\n      - ")[0]  # up to the next rule of the group
        assert re.search(r"severity: (critical|warning)\b", body), name
        assert "summary:" in body, name
        assert "description:" in body, name


# -- Grafana dashboard ------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    queries: list[str] = []
    for panel in dashboard["panels"]:
        queries += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["definition"])
    return queries


def test_dashboard_is_importable_with_datasource_and_filters() -> None:
    """Schema >= 36, a Prometheus data source variable used by every panel, source/event filters."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("source", "event"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"]
        assert variables[name]["multi"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            if "event" in target["expr"] and "forwarder_" in target["expr"]:
                assert 'event=~"$event"' in target["expr"], target["expr"]
    queries = " ".join(_dashboard_queries(dashboard))
    wanted = [
        "forwarder_messages_received_total",
        "forwarder_messages_forwarded_total",
        "forwarder_connected",
        "forwarder_close_codes_total",
        "forwarder_reconnects_total",
        "forwarder_handshake_failures_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "forwarder_spool_pending_messages",
        "forwarder_spool_bytes",
        "forwarder_redis_errors_total",
        "forwarder_invalid_messages_total",
    ]
    for text in wanted:
        assert text in queries, f"no panel uses {text}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query parses: promtool checks them as recording rules."""
    promtool = tool("promtool", "prometheus")
    grafana_vars = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$job": "forwarder",
        "$instance": ".*",
        "$source": ".*",
        "$event": ".*",
    }
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, query in enumerate(_dashboard_queries(_dashboard())):
        expr = query
        if expr.startswith("label_values("):  # Grafana's own function: check its selector
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, query
        lines += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    code, out = run([promtool, "check", "rules", str(rules)])
    assert code == 0, out


# -- metric names -----------------------------------------------------------------------------


@pytest.fixture
def exported_metrics(
    make_config: ConfigFactory, run_forwarder: Callable[..., Forwarder]
) -> set[str]:
    """Every metric and sample name a running Forwarder exposes on /metrics."""
    forwarder = run_forwarder(make_config({"main": ["messages.upsert", "call.upsert"]}))
    url = f"http://127.0.0.1:{forwarder.http.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            # Families with no sample yet (e.g. a token without exp) still declare a type.
            _, _, name, kind = line.split()
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _referenced_metrics() -> dict[str, set[str]]:
    """{metric name: files that use it} for the rules, their tests and the dashboard."""
    found: dict[str, set[str]] = {}
    sources = {
        RULES.name: _without_comments(RULES.read_text()),
        RULE_TESTS.name: _without_comments(RULE_TESTS.read_text()),
        DASHBOARD.name: " ".join(_dashboard_queries(_dashboard())),
    }
    for where, text in sources.items():
        for name in _METRIC_RE.findall(text):
            found.setdefault(name, set()).add(where)
        if re.search(r"\bup\{", text):
            found.setdefault("up", set()).add(where)
    return found


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_rules_and_dashboard_only_use_exported_metrics(exported_metrics: set[str]) -> None:
    """No alert or panel reads a metric forwarder does not export (a typo would stay silent)."""
    referenced = _referenced_metrics()
    assert "forwarder_connected" in exported_metrics  # the scrape worked
    unknown = {
        name: sorted(where)
        for name, where in referenced.items()
        if name not in exported_metrics
        and name not in PLANNED_METRICS
        and name not in PROMETHEUS_METRICS
    }
    assert unknown == {}


def test_planned_metrics_are_still_planned(exported_metrics: set[str]) -> None:
    """PLANNED_METRICS only lists metrics that are referenced and not exported yet."""
    referenced = _referenced_metrics()
    for name in PLANNED_METRICS:
        assert name in referenced, f"{name} is no longer used: remove it from PLANNED_METRICS"
        assert name not in exported_metrics, (
            f"{name} is exported now: remove it from PLANNED_METRICS in tests/test_deploy.py"
        )


# -- systemd unit -----------------------------------------------------------------------------


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's `forwarder`: `systemd-analyze verify`
    checks that the binary exists, and /opt/forwarder is not installed here."""
    assert VENV_FORWARDER.exists(), f"{VENV_FORWARDER} missing: run `make install-dev`"
    text = UNIT.read_text()
    assert "ExecStart=/opt/forwarder/venv/bin/forwarder " in text
    text = text.replace(
        "ExecStart=/opt/forwarder/venv/bin/forwarder ", f"ExecStart={VENV_FORWARDER} "
    )
    copy = tmp_path / "forwarder.service"  # same name: the credentials path depends on it
    copy.write_text(text)
    return copy


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing: no unknown key, bad value or missing program."""
    analyze = tool("systemd-analyze", "systemd")
    code, out = run([analyze, "verify", str(_unit_copy(tmp_path))], cwd=tmp_path)
    assert code == 0, out
    assert out.strip() == ""


def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the hardened unit 2.0 or better."""
    analyze = tool("systemd-analyze", "systemd")
    # --threshold is in tenths: 20 means fail above an exposure of 2.0.
    argv = [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager"]
    code, out = run([*argv, str(_unit_copy(tmp_path))], cwd=tmp_path)
    match = re.search(r"Overall exposure level for forwarder\.service: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out
    assert code == 0, out


def test_unit_settings_match_the_daemon_and_the_example_config() -> None:
    """Type=notify with watchdog, restart policy, credentials and stop timeout fit the daemon."""
    unit = _unit_settings()
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["2"],  # ExitCode.CONFIG
        "StateDirectory": ["forwarder"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "DynamicUser": ["yes"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert "MemoryMax" in unit
    assert "Environment" not in unit  # a token there would be world-readable
    credentials = dict(c.split(":", 1) for c in unit["LoadCredential"])
    assert credentials["token"] == "/etc/forwarder/token"
    config_credential = unit["ExecStart"][0].split("--config ")[1]
    assert config_credential == "%d/forwarder.toml"
    assert credentials["forwarder.toml"] == "/etc/forwarder/forwarder.toml"
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert example["sources"][0]["token_file"] == "/run/credentials/forwarder.service/token"
    assert "dir" not in example.get("spool", {})  # defaults to $STATE_DIRECTORY/spool
    # systemd's SIGKILL must not cut the drain short.
    assert float(unit["TimeoutStopSec"][0]) > example["shutdown_timeout"]


def test_example_config_is_valid_apart_from_the_credential_path(tmp_path: Path) -> None:
    """deploy/forwarder.toml loads like `forwarder check-config` once the token file exists."""
    token = tmp_path / "token"
    token.write_text(mint_token("main", SECRET))
    text = EXAMPLE_CONFIG.read_text().replace(
        "/run/credentials/forwarder.service/token", str(token)
    )
    path = tmp_path / "forwarder.toml"
    path.write_text(text)
    config = load_config(path, {"STATE_DIRECTORY": str(tmp_path / "state")})
    assert config.spool.dir == tmp_path / "state" / "spool"
    assert [s.name for s in config.sources] == ["main"]


# -- install and uninstall --------------------------------------------------------------------


@pytest.mark.slow
def test_make_install_and_uninstall_into_destdir(tmp_path: Path) -> None:
    """`make install DESTDIR=… PREFIX=/opt/forwarder` builds a working tree; uninstall empties it
    except the configuration."""
    make = tool("make", "make")
    dest = tmp_path / "root"
    args = [make, "-s", f"DESTDIR={dest}", "PREFIX=/opt/forwarder", f"PYTHON={sys.executable}"]
    # pip finds the dependencies in its cache, PIP_FIND_LINKS or the index (network).
    code, out = run([*args, "install"], cwd=ROOT, timeout=180)
    assert code == 0, out
    venv = dest / "opt" / "forwarder" / "venv"
    # The scripts point at the final location; run them with the staged interpreter.
    assert (venv / "bin" / "forwarder").read_text().startswith("#!/opt/forwarder/venv/bin/python")
    code, version = run(
        [str(venv / "bin" / "python"), str(venv / "bin" / "forwarder"), "--version"]
    )
    assert code == 0, version
    assert version.startswith("forwarder ")
    assert (dest / "opt" / "forwarder" / "README.md").read_text() == (
        ROOT / "README.md"
    ).read_text()
    unit = dest / "etc" / "systemd" / "system" / "forwarder.service"
    assert unit.read_text() == UNIT.read_text()
    config = dest / "etc" / "forwarder" / "forwarder.toml"
    assert config.read_text() == EXAMPLE_CONFIG.read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    assert not (dest / "etc" / "forwarder" / "token").exists()
    assert "/etc/forwarder/token" in out
    assert "systemctl enable --now forwarder" in out

    # A second install upgrades in place and keeps an edited configuration.
    config.write_text("# edited\n")
    code, out = run([*args, "install"], cwd=ROOT, timeout=180)
    assert code == 0, out
    assert config.read_text() == "# edited\n"

    code, out = run([*args, "uninstall"], cwd=ROOT, timeout=60)
    assert code == 0, out
    assert not (dest / "opt" / "forwarder").exists()
    assert not unit.exists()
    assert config.read_text() == "# edited\n"  # kept: the operator's configuration


def test_scripts_are_posix_sh() -> None:
    """install.sh and uninstall.sh parse under a strict POSIX shell (dash when present)."""
    shell = shutil.which("dash") or tool("sh", "dash")
    for name in ("install.sh", "uninstall.sh"):
        code, out = run([shell, "-n", str(ROOT / "scripts" / name)])
        assert code == 0, out

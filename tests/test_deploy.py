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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import Config, load_config
from forwarder.daemon import Forwarder
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET, ConfigFactory
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "forwarder-rules.yml"
# The rule tests with the series of each [metrics] detail mode.
RULE_TESTS = {
    "event": ROOT / "deploy" / "prometheus" / "forwarder-rules.test.yml",
    "subscription": ROOT / "deploy" / "prometheus" / "forwarder-rules.subscription.test.yml",
}
DETAILS = tuple(RULE_TESTS)
DASHBOARD = ROOT / "deploy" / "grafana" / "forwarder-dashboard.json"
UNIT = ROOT / "systemd" / "forwarder.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "forwarder.toml"
# The console script of this checkout's virtualenv (what `make install-dev` created).
VENV_FORWARDER = Path(sys.executable).parent / "forwarder"
MAX_EXPOSURE = 2.0

# Metrics the rules, their tests or the dashboard use before forwarder exports them (name ->
# why). The entries must be exactly the referenced metrics that are not exported
# (test_planned_metrics_are_still_planned), so the list shrinks as the work lands. Empty:
# everything referenced is exported today.
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


@pytest.mark.parametrize("detail", DETAILS)
def test_alert_rule_unit_tests_pass(detail: str) -> None:
    """`promtool test rules` passes in both detail modes: each alert fires and stays quiet
    when it should."""
    promtool = tool("promtool", "prometheus")
    tests = RULE_TESTS[detail]
    code, out = run([promtool, "test", "rules", tests.name], cwd=tests.parent)
    assert code == 0, out
    assert "SUCCESS" in out


@pytest.mark.parametrize("detail", DETAILS)
def test_every_alert_is_tested_firing_and_not_firing(detail: str) -> None:
    """In each mode's rule tests, each alert has a case that expects it and one that
    expects nothing."""
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)
    assert len(alerts) == len(set(alerts)) >= 10
    fires: set[str] = set()
    quiet: set[str] = set()
    # A case runs from "- alertname: X" to the next case or test; it expects alerts
    # exactly when it has an exp_alerts list.
    cases = re.split(
        r"^\s*- (?=alertname:|name:)", RULE_TESTS[detail].read_text(), flags=re.MULTILINE
    )
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
        "forwarder_subscriptions",
        "forwarder_subscription_problem{",
        "forwarder_subscription_problems",
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


# -- metric names and label sets, in both detail modes ---------------------------------------

ALERT_NAMES = re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)


@dataclass
class Scrape:
    """What a running Forwarder exposes on /metrics in one detail mode."""

    detail: str
    text: str
    # Sample (or declared family) name -> the label names of its samples, sorted.
    labels: dict[str, set[tuple[str, ...]]]


def _with_metrics(config: Config, **settings: str) -> Config:
    """The same configuration file with more [metrics] keys."""
    assert config.path is not None
    text = config.path.read_text()
    keys = "".join(f'{key} = "{value}"\n' for key, value in settings.items())
    config.path.write_text(
        text.replace('listen = "127.0.0.1:0"\n', f'listen = "127.0.0.1:0"\n{keys}')
    )
    return load_config(config.path, {})


@pytest.fixture(params=DETAILS)
def scrape(
    request: pytest.FixtureRequest,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    tmp_path: Path,
) -> Scrape:
    """/metrics of a Forwarder with one healthy, one rejected (401) and one stalled
    subscription, in each detail mode; "event" without source labels, as at fleet scale."""
    detail: str = request.param
    simulator.reject(count=-1, event="call.upsert")
    config = make_config(
        {"main": ["messages.upsert", "call.upsert", "chats.update"]},
        extra='[metrics.stall_after]\n"chats.update" = 1\n',
    )
    # A token with an exp claim (30 days: no alert), so that its gauge has a sample.
    (tmp_path / "main.token").write_text(mint_token("main", SECRET, expires_in=30 * 86400))
    settings = {"detail": detail} if detail == "subscription" else {"source_label": "never"}
    forwarder = run_forwarder(_with_metrics(config, **settings))
    wait_for(lambda: forwarder.stats[0].state.value == "connected", what="connected")
    simulator.send("main", "messages.upsert", 3)
    wait_for(lambda: forwarder.stats[0].forwarded == 3, what="frames forwarded")
    wait_for(lambda: forwarder.stats[1].last_handshake_status == "401", what="401 seen")
    wait_for(lambda: forwarder.status({"state": ["stalled"]})[1]["subscriptions"], what="stalled")
    url = f"http://127.0.0.1:{forwarder.http.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    labels: dict[str, set[tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        # Families with no sample yet (e.g. a token without exp) still declare a type.
        names = {family.name + "_total"} if family.type == "counter" else {family.name}
        if family.type == "histogram":
            names = {family.name + s for s in ("_bucket", "_sum", "_count")}
        for name in names:
            labels.setdefault(name, set())
        for sample in family.samples:
            labels.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))
    return Scrape(detail, text, labels)


def _referenced_metrics(detail: str) -> dict[str, set[str]]:
    """{metric name: files that use it} for the rules, the detail's rule tests and the
    dashboard."""
    found: dict[str, set[str]] = {}
    tests = RULE_TESTS[detail]
    sources = {
        RULES.name: _without_comments(RULES.read_text()),
        tests.name: _without_comments(tests.read_text()),
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


def test_rules_and_dashboard_only_use_exported_metrics(scrape: Scrape) -> None:
    """No alert, rule test or panel reads a metric this mode does not export (a typo, or a
    series only the other mode has, would stay silent)."""
    referenced = _referenced_metrics(scrape.detail)
    assert "forwarder_subscriptions" in scrape.labels  # the scrape worked
    unknown = {
        name: sorted(where)
        for name, where in referenced.items()
        if name not in scrape.labels
        and name not in PLANNED_METRICS
        and name not in PROMETHEUS_METRICS
    }
    assert unknown == {}


def test_planned_metrics_are_still_planned(scrape: Scrape) -> None:
    """PLANNED_METRICS is exactly what is referenced and not exported yet: a planned metric
    that now exists, or is no longer used, must leave the list; a new one must join it."""
    missing = set(_referenced_metrics(scrape.detail)) - set(scrape.labels) - PROMETHEUS_METRICS
    assert missing == set(PLANNED_METRICS), (
        "update PLANNED_METRICS in tests/test_deploy.py: "
        f"referenced but not exported {sorted(missing)}, listed {sorted(PLANNED_METRICS)}"
    )


def test_rule_tests_use_the_label_sets_each_mode_exports(scrape: Scrape) -> None:
    """Each input series of a mode's rule tests has labels that mode's series really carry
    (plus job and instance): an alert tested on imagined labels proves nothing."""
    text = RULE_TESTS[scrape.detail].read_text()
    series = re.findall(r"series: '([a-z_:]+)\{([^}]*)\}'", text)
    assert len(series) > 20
    for name, body in series:
        if name in PROMETHEUS_METRICS or name == "process_start_time_seconds":
            continue
        keys = tuple(
            sorted(
                {k.strip() for k, _, _ in (p.partition("=") for p in body.split(","))}
                - {"job", "instance"}
            )
        )
        assert keys in scrape.labels.get(name, set()), (
            f"{name}{{{body}}}: {scrape.detail} exports {sorted(scrape.labels.get(name, ()))}"
        )


def test_alerts_fire_on_what_a_running_forwarder_exports(scrape: Scrape, tmp_path: Path) -> None:
    """promtool over a real scrape, held for 10 minutes: in both modes exactly the alerts
    for the rejected and the stalled subscription fire, naming source and event."""
    promtool = tool("promtool", "prometheus")
    lines = [
        f"rule_files: [{json.dumps(str(RULES))}]",
        "evaluation_interval: 1m",
        "tests:",
        "  - interval: 1m",
        "    input_series:",
    ]
    for family in text_string_to_metric_families(scrape.text):
        for sample in family.samples:
            labels = {"job": "forwarder", "instance": "fw1:9108", **sample.labels}
            body = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
            lines += [
                f"      - series: {json.dumps(sample.name + '{' + body + '}')}",
                f'        values: "{sample.value!r}x10"',
            ]
    firing = [
        ("ForwarderHandshakeAuthFailures", "critical", "call.upsert", "auth"),
        ("ForwarderSubscriptionDown", "critical", "call.upsert", "down"),
        ("ForwarderSubscriptionStalled", "warning", "chats.update", "stalled"),
    ]
    lines += [
        "    promql_expr_test:",
        '      - expr: ALERTS{alertstate="firing"}',
        "        eval_time: 5m",
        "        exp_samples:",
    ]
    for alert, severity, event, problem in firing:
        labels = {
            "alertname": alert,
            "alertstate": "firing",
            "severity": severity,
            "job": "forwarder",
            "instance": "fw1:9108",
            "source": "main",
            "event": event,
            "problem": problem,
        }
        body = ", ".join(f"{k}={json.dumps(v)}" for k, v in labels.items())
        lines += [
            f"          - labels: {json.dumps('ALERTS{' + body + '}')}",
            "            value: 1",
        ]
    tests = tmp_path / "scrape.test.yml"
    tests.write_text("\n".join(lines) + "\n")
    code, out = run([promtool, "test", "rules", str(tests)])
    assert code == 0, out


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

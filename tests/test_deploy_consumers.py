"""The consumer-side alert rules and dashboard: checked with promtool, against what forwarder
exports. (tests/test_deploy.py checks forwarder-rules.yml and the main dashboard.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from forwarder.daemon import Forwarder
from tests.conftest import ConfigFactory
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "forwarder-consumer-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "forwarder-consumer-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "forwarder-consumers-dashboard.json"
_METRIC_RE = re.compile(r"\b(?:forwarder|process)_[a-z0-9_]+\b")


def promtool(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed (`make test` installs it; apt-get install prometheus)"
        )
    proc = subprocess.run(
        [path, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_consumer_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the consumer rules (syntax, PromQL, templates)."""
    code, out = promtool("check", "rules", str(RULES))
    assert code == 0, out
    assert "SUCCESS" in out


def test_consumer_rule_unit_tests_pass() -> None:
    """`promtool test rules`: each alert fires and stays quiet when it should."""
    code, out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert code == 0, out
    assert "SUCCESS" in out


def test_every_consumer_alert_is_tested_both_ways_and_annotated() -> None:
    """Each alert has a case expecting it and one expecting nothing; severity, summary, text."""
    text = RULES.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", text, re.MULTILINE)
    assert set(alerts) == {
        "ForwarderConsumerGroupLagging",
        "ForwarderConsumerPendingStuck",
        "ForwarderUnreadEntriesTrimmed",
        "ForwarderConsumerStatsStale",
    }
    fires: set[str] = set()
    quiet: set[str] = set()
    cases = re.split(r"^\s*- (?=alertname:|name:)", RULE_TESTS.read_text(), flags=re.MULTILINE)
    for case in cases:
        match = re.match(r"alertname: (\w+)", case)
        if match:
            (fires if "exp_labels:" in case else quiet).add(match.group(1))
    assert set(alerts) - fires == set(), "alerts never shown firing"
    assert set(alerts) - quiet == set(), "alerts never shown quiet"
    for block in re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]:
        name = block.split()[0]
        assert re.search(r"severity: (critical|warning)\b", block), name
        assert "summary:" in block, name
        assert "description:" in block, name


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def test_consumer_dashboard_is_importable_and_filters_by_stream_and_group() -> None:
    """A data source variable used by every panel; every stream/group series filtered by them."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for name in ("job", "instance", "stream", "group"):
        assert variables[name]["includeAll"]
        assert variables[name]["multi"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'job=~"$job"' in expr, expr
            if "consumer_group" in expr or "trimmed_unread" in expr:
                assert 'group=~"$group"' in expr, expr
            if "forwarder_stream" in expr or "consumer_group" in expr:
                assert 'stream=~"$stream"' in expr, expr
    queries = " ".join(_queries(dashboard))
    for name in (
        "forwarder_consumer_group_lag",
        "forwarder_consumer_group_pending",
        "forwarder_consumer_group_oldest_pending_age_seconds",
        "forwarder_stream_trimmed_unread_total",
        "forwarder_stream_length",
    ):
        assert name in queries, f"no panel shows {name}"


def test_consumer_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every query parses: promtool checks them as recording rules."""
    values = {
        "$__rate_interval": "5m",
        "$job": ".*",
        "$instance": ".*",
        "$stream": ".*",
        "$group": ".*",
    }
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, query in enumerate(_queries(_dashboard())):
        expr = query
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, query
        lines += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    code, out = promtool("check", "rules", str(rules))
    assert code == 0, out


def test_consumer_rules_and_dashboard_use_only_exported_metrics(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    redis_client: redis.Redis,
) -> None:
    """Every metric the rules, their tests and the dashboard name is on a forwarder's /metrics."""
    redis_client.xgroup_create("main:messages.upsert", "billing", id="0", mkstream=True)
    forwarder = run_forwarder(make_config(extra="[consumers]\ninterval = 0.2\n"))
    wait_for(lambda: forwarder.consumers.snapshot().rounds > 0, what="a monitor round")
    url = f"http://127.0.0.1:{forwarder.http.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    exported: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported.add(
                name + "_total" if kind == "counter" and not name.endswith("_total") else name
            )
        elif line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    sources = [
        _without_comments(RULES.read_text()),
        _without_comments(RULE_TESTS.read_text()),
        " ".join(_queries(_dashboard())),
    ]
    referenced = {name for text_ in sources for name in _METRIC_RE.findall(text_)}
    assert referenced - exported == set()
    assert "forwarder_consumer_group_lag" in referenced


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))

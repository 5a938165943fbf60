"""`forwarder watch`: the table while it fits the terminal, the summary when it does not;
over a real /status endpoint built from real stats."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from forwarder import watch
from forwarder.errors import ExitCode
from forwarder.http import HttpServer
from forwarder.stats import State
from tests.test_status import Report


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Report, str]]:
    """/status of 40 sources x 13 events (520 subscriptions) on a loopback port."""
    report = Report(tmp_path / "spool", 40)
    server = HttpServer(
        "127.0.0.1",
        0,
        CollectorRegistry(auto_describe=False),
        lambda: (True, {}),
        lambda: (True, {}),
        report.report.build,
    )
    server.start()
    try:
        yield report, f"http://127.0.0.1:{server.port}/status"
    finally:
        server.stop()
        server.join(5)
        report.spool.close()


def break_some(report: Report, count: int) -> None:
    for n, s in enumerate(report.stats[:count]):
        s.state = State.BACKOFF
        s.last_handshake_status = "401" if n % 2 else "502"
        s.last_error = f"HTTP {s.last_handshake_status}"


def test_a_fleet_gets_the_summary_within_the_terminals_height(
    served: tuple[Report, str],
) -> None:
    """520 rows do not fit 40 lines: counts, a row per event, the unhealthy ones, <= 40 lines."""
    report, url = served
    break_some(report, 3)
    screen = watch.refresh(url, None, "auto", 120, 40)
    lines = screen.splitlines()
    assert len(lines) <= 40
    assert "520 subscriptions: connected 517  backoff 3   unhealthy 3 (down 3, auth 1)" in lines
    assert "40 sources, 1 with unhealthy subscriptions" in lines
    events = [line.split()[0] for line in lines if line.split()[:1] and "." in line.split()[0]]
    assert {"messages.upsert", "call.upsert", "qrcode.updated"} <= set(events)
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("wa0000/")}
    assert rows["wa0000/connection.update"][1:3] == ["backoff", "down,auth"]
    assert rows["wa0000/connection.update"][4] == "401"
    assert max(len(line) for line in lines) <= 120


def test_the_summary_lists_as_many_unhealthy_rows_as_fit_and_says_so(
    served: tuple[Report, str],
) -> None:
    """50 unhealthy subscriptions on 30 lines: the rows that fit, and where to find the rest."""
    report, url = served
    break_some(report, 50)
    lines = watch.refresh(url, None, "auto", 0, 30).splitlines()
    assert len(lines) <= 30
    shown = [line for line in lines if line.startswith("wa00")]
    assert 0 < len(shown) < 50
    assert f"UNHEALTHY 50 (showing {len(shown)}; /status?state=unhealthy lists all)" in lines


def test_the_table_when_it_fits_or_is_asked_for_with_every_row(
    served: tuple[Report, str],
) -> None:
    """No terminal height (a pipe) or --view table: a row per subscription, fetched with
    ?state=all since the summary has none at this size."""
    _, url = served
    for screen in (
        watch.refresh(url, None, "auto", 0, 0),
        watch.refresh(url, None, "table", 0, 40),
    ):
        rows = [line for line in screen.splitlines() if line.startswith("wa")]
        assert len(rows) == 520
        assert rows[0].split()[:2] == ["wa0000/qrcode.updated", "connected"]
    assert "SUBS" in watch.refresh(url, None, "summary", 0, 0)


def test_run_redraws_count_times_and_exits_ok(served: tuple[Report, str]) -> None:
    """--count 2: two screens, exit 0; the terminal size is read for each one."""
    _, url = served
    out = io.StringIO()
    sizes = iter([(100, 30), (100, 0)])
    code = watch.run(url, count=2, interval=0.0, out=out, terminal=lambda: next(sizes))
    assert code == ExitCode.OK
    text = out.getvalue()
    assert text.count("forwarder ") == 2
    assert "\nUNHEALTHY " not in text  # everything healthy: no list of culprits
    assert "EVENT" in text  # the first screen: summary (30 lines)
    assert "SOURCE/EVENT" in text  # the second: the table

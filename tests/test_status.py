"""/status: the summary, the filters, the unhealthy rows, and no failure while a reload grows
the lists; unit tests over real stats and a real spool, then through a running daemon."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder import status as status_module
from forwarder.config import DEFAULT_STALL_AFTER, load_config
from forwarder.daemon import Forwarder
from forwarder.events import SENT_EVENTS
from forwarder.problems import HealthPolicy, ProblemFinder
from forwarder.spool import DiskSpool, Route
from forwarder.stats import State, SubscriptionStats, WriterStats
from forwarder.status import ALL_ROWS_UP_TO, StatusReport
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import wait_for

NOW = 1_800_000_000.0


class Report:
    """A StatusReport over `sources` x 13 events, all connected and recently heard from."""

    def __init__(self, spool_dir: Path, sources: int) -> None:
        names = [f"wa{n:04d}" for n in range(sources)]
        routes = [Route(s, e, f"{s}:{e}", f"{s}:{e}:dlq") for s in names for e in SENT_EVENTS]
        self.spool = DiskSpool(spool_dir, routes, max_bytes=1 << 30)
        self.stats = [SubscriptionStats(r.source, r.event, r.stream) for r in routes]
        for s in self.stats:
            s.state = State.CONNECTED
            s.last_message_at = NOW - 5
        problems = ProblemFinder(HealthPolicy(dict(DEFAULT_STALL_AFTER), started_at=NOW - 60))
        self.report = StatusReport(
            lambda: self.stats,
            self.spool,
            WriterStats(),
            problems,
            lambda: True,
            "redis://127.0.0.1:6379/0",
            str(spool_dir),
            NOW - 60,
            clock=lambda: NOW,
        )

    def get(self, **query: str) -> dict[str, Any]:
        code, doc = self.report.build({k: [v] for k, v in query.items()})
        assert code == 200, doc
        return doc

    def find(self, source: str, event: str) -> SubscriptionStats:
        return next(s for s in self.stats if (s.source, s.event) == (source, event))


@pytest.fixture
def reports(tmp_path: Path) -> Iterator[Callable[[int], Report]]:
    made: list[Report] = []

    def make(sources: int) -> Report:
        report = Report(tmp_path / f"spool{len(made)}", sources)
        made.append(report)
        return report

    yield make
    for report in made:
        report.spool.close()


def pairs(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['source']}/{r['event']}" for r in rows]


def test_a_small_deployment_gets_the_summary_and_every_row(
    reports: Callable[[int], Report],
) -> None:
    """Up to ALL_ROWS_UP_TO subscriptions, the default document lists them all."""
    r = reports(2)
    r.find("wa0001", "call.upsert").state = State.BACKOFF
    doc = r.get()
    assert len(doc["subscriptions"]) == 26 <= ALL_ROWS_UP_TO
    assert doc["summary"]["subscriptions"] == 26
    assert doc["summary"]["states"]["connected"] == 25
    assert doc["summary"]["problems"]["down"] == 1
    assert pairs(doc["unhealthy"]) == ["wa0001/call.upsert"]
    assert doc["unhealthy"][0]["problems"] == ["down"]


def test_a_fleet_gets_counts_per_source_event_and_state_and_the_unhealthy_rows(
    reports: Callable[[int], Report],
) -> None:
    """Beyond ALL_ROWS_UP_TO: no row per subscription, but the culprits in full."""
    r = reports(40)
    rejected = r.find("wa0012", "messages.upsert")
    rejected.state = State.BACKOFF
    rejected.last_handshake_status = "401"
    rejected.last_error = "HTTP 401 for token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    r.find("wa0030", "chats.update").last_message_at = NOW - 4000  # over 3600 s: stalled
    for n, s in enumerate(r.stats):
        s.received = n
    doc = r.get()
    assert "subscriptions" not in doc
    assert doc["summary"] == {
        "subscriptions": 520,
        "states": {"starting": 0, "connecting": 0, "connected": 519, "backoff": 1, "stopped": 0},
        "problems": {
            "down": 1,
            "auth": 1,
            "stalled": 1,
            "reconnecting": 0,
            "displaced": 0,
            "token_expiring": 0,
        },
        "unhealthy": 2,
    }
    assert pairs(doc["unhealthy"]) == ["wa0012/messages.upsert", "wa0030/chats.update"]
    row = doc["unhealthy"][0]
    assert row["problems"] == ["down", "auth"]
    assert row["last_handshake_status"] == "401"
    assert "eyJ" not in row["last_error"]  # redacted
    assert doc["sources"]["wa0012"]["states"]["backoff"] == 1
    assert doc["sources"]["wa0012"]["unhealthy"] == 1
    assert doc["sources"]["wa0000"]["unhealthy"] == 0
    assert len(doc["sources"]) == 40
    upsert = [n for n, s in enumerate(r.stats) if s.event == "messages.upsert"]
    assert doc["events"]["messages.upsert"]["received"] == sum(upsert)
    assert doc["events"]["messages.upsert"]["connected"] == 39


def test_filters_return_the_full_rows_that_match(reports: Callable[[int], Report]) -> None:
    """source, event and state combine with AND; values of one parameter with OR."""
    r = reports(40)
    r.find("wa0003", "call.upsert").state = State.CONNECTING
    r.find("wa0004", "call.upsert").state = State.BACKOFF
    assert pairs(r.get(source="wa0002", event="chats.update")["subscriptions"]) == [
        "wa0002/chats.update"
    ]
    assert len(r.get(source="wa0002,wa0005")["subscriptions"]) == 26
    down = r.get(state="down")
    assert pairs(down["subscriptions"]) == ["wa0003/call.upsert", "wa0004/call.upsert"]
    assert down["filters"] == {"state": ["down"]}
    assert pairs(r.get(state="backoff")["subscriptions"]) == ["wa0004/call.upsert"]
    assert len(r.get(state="unhealthy")["subscriptions"]) == 2
    assert len(r.get(event="call.upsert", state="connected")["subscriptions"]) == 38
    assert len(r.get(state="all")["subscriptions"]) == 520
    assert r.get(source="nobody")["subscriptions"] == []
    code, doc = r.report.build({"state": ["down"], "source": ["wa0003", "wa0004"]})
    assert code == 200
    assert len(doc["subscriptions"]) == 2


def test_a_bad_query_is_a_400_that_says_what_is_accepted(reports: Callable[[int], Report]) -> None:
    """Unknown parameters and states are refused with a message, not ignored."""
    r = reports(1)
    code, doc = r.report.build({"sauce": ["x"]})
    assert code == 400
    assert doc["error"] == "unknown parameter 'sauce': /status takes source, event and state"
    code, doc = r.report.build({"state": ["sleepy"]})
    assert code == 400
    assert doc["error"].startswith("unknown state 'sleepy': use one of starting, connecting")
    code, doc = r.report.build({"event": [""]})
    assert code == 400


def test_unhealthy_rows_are_capped_and_say_so(
    reports: Callable[[int], Report], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mass outage does not make the summary as big as the fleet; the flag says it is cut."""
    monkeypatch.setattr(status_module, "UNHEALTHY_ROWS_MAX", 3)
    r = reports(10)
    for s in r.stats[:10]:
        s.state = State.CONNECTING
    doc = r.get()
    assert len(doc["unhealthy"]) == 3
    assert doc["unhealthy_truncated"] is True
    assert doc["summary"]["unhealthy"] == 10
    assert len(r.get(state="down")["subscriptions"]) == 10  # the filter lists them all


def test_stats_ahead_of_the_spools_counters_do_not_fail_the_build(
    reports: Callable[[int], Report],
) -> None:
    """Half a reload (stats appended, the spool's counter not yet): a row with 0 pending,
    never an IndexError."""
    r = reports(1)
    r.stats.append(SubscriptionStats("late", "messages.upsert", "late:messages.upsert"))
    doc = r.get(source="late")
    assert doc["subscriptions"][0]["spool_pending"] == 0
    assert doc["events"]["messages.upsert"]["subscriptions"] == 2


# -- through the daemon -------------------------------------------------------------------


def fetch(forwarder: Forwarder, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{forwarder.http.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read()) if path != "/metrics" else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_passes_the_filters_and_answers_400_for_bad_ones(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """GET /status?state=... on the real endpoint: rows of the rejected subscription; 400s."""
    simulator.reject(count=-1, event="call.upsert")
    forwarder = run_forwarder(make_config({"main": ["messages.upsert", "call.upsert"]}))
    wait_for(lambda: forwarder.stats[0].state is State.CONNECTED, what="one connected")
    wait_for(lambda: forwarder.stats[1].last_handshake_status == "401", what="the other rejected")
    code, doc = fetch(forwarder, "/status?state=auth")
    assert code == 200
    assert pairs(doc["subscriptions"]) == ["main/call.upsert"]
    assert doc["subscriptions"][0]["problems"] == ["down", "auth"]
    code, doc = fetch(forwarder, "/status?state=nope")
    assert code == 400
    assert "unknown state 'nope'" in doc["error"]


@pytest.mark.slow
def test_status_and_metrics_never_fail_while_reloads_add_events(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> None:
    """Readers hammer /status and /metrics while reloads keep adding events: all 200."""
    config = make_config({"main": ["messages.upsert"]})
    assert config.path is not None
    path = config.path
    forwarder = run_forwarder(config, reload=lambda: load_config(path, {}))
    stop = threading.Event()
    failures: list[str] = []
    answers = [0]

    def reader() -> None:
        while not stop.is_set() and answers[0] < 100_000:
            for page in ("/status", "/status?state=all", "/metrics"):
                code, _ = fetch(forwarder, page)
                if code != 200:
                    failures.append(f"{page}: {code}")
                answers[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        events = ["messages.upsert"]
        for event in SENT_EVENTS[:6]:
            if event in events:
                continue
            events.append(event)
            text = path.read_text()
            old = text[text.index("events = [") : text.index("]", text.index("events = [")) + 1]
            path.write_text(
                text.replace(old, "events = [" + ", ".join(f'"{e}"' for e in events) + "]")
            )
            assert forwarder.reload()
        wait_for(lambda: answers[0] >= 30, 30, "readers answered")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len(forwarder.stats) == 6
    _, doc = fetch(forwarder, "/status")
    assert doc["summary"]["subscriptions"] == 6

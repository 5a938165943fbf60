"""The collector: bounded series in the default detail, every series in "subscription", the
problem series that name the culprit; against real stats and a real spool, no daemon."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forwarder import metrics
from forwarder.config import DEFAULT_STALL_AFTER
from forwarder.events import SENT_EVENTS
from forwarder.metrics import ForwarderCollector, build_registry, source_labelled
from forwarder.problems import PROBLEMS, HealthPolicy, ProblemFinder
from forwarder.spool import DiskSpool, Route
from forwarder.stats import State, SubscriptionStats, WriterStats

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0
# Series one more subscription adds in detail "subscription" (README, "Metrics and
# endpoints"): 6 counters, 4 labelled counters at their initial label values (close code
# 1006, status 401, 2 resubscribe reasons; no dead letter yet), disconnected seconds, last
# message, flapping, pending, connected, and the 16 + 1 buckets, sum and count of the
# latency histogram.
SERIES_PER_SUBSCRIPTION = 6 + 4 + 4 + 1 + 19
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Fleet:
    """SubscriptionStats for sources x events, a real spool holding their routes, and a
    collector over them, as the daemon wires it."""

    def __init__(
        self,
        spool_dir: Path,
        sources: int,
        events: tuple[str, ...] = SENT_EVENTS,
        detail: str = "event",
        source_label: str = "auto",
    ) -> None:
        names = [f"wa{n:04d}" for n in range(sources)]
        routes = [
            Route(src, ev, f"{src}:{ev}", f"{src}:{ev}:dlq") for src in names for ev in events
        ]
        self.spool = DiskSpool(spool_dir, routes, max_bytes=1 << 30)
        self.stats = [SubscriptionStats(r.source, r.event, r.stream) for r in routes]
        for s in self.stats:
            s.state = State.CONNECTED
            s.last_message_at = NOW - 10
        self.problems = ProblemFinder(HealthPolicy(dict(DEFAULT_STALL_AFTER), started_at=NOW))
        collector = ForwarderCollector(
            lambda: self.stats,
            WriterStats(),
            self.spool,
            self.problems,
            detail=detail,
            by_source=source_labelled(source_label, sources),
            clock=lambda: NOW,
        )
        self.registry = build_registry(collector)

    def scrape(self) -> Samples:
        text = generate_latest(self.registry).decode()
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                assert key not in out, f"duplicate series {key}"
                out[key] = s.value
        return out


@pytest.fixture
def fleets(tmp_path: Path) -> Iterator[list[Fleet]]:
    """Fleets made with `make(...)` are closed at the end of the test."""
    made: list[Fleet] = []
    yield made
    for fleet in made:
        fleet.spool.close()


def make(
    fleets: list[Fleet],
    tmp_path: Path,
    sources: int,
    events: tuple[str, ...] = SENT_EVENTS,
    detail: str = "event",
    source_label: str = "auto",
) -> Fleet:
    fleet = Fleet(tmp_path / f"spool{len(fleets)}", sources, events, detail, source_label)
    fleets.append(fleet)
    return fleet


def forwarder_series(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0].startswith("forwarder_")}


def labels_of(samples: Samples, name: str) -> set[tuple[str, ...]]:
    return {tuple(k for k, _ in labels) for n, labels in samples if n == name}


# -- detail "event" -----------------------------------------------------------------------


def test_default_detail_adds_only_state_counts_per_source(
    fleets: list[Fleet], tmp_path: Path
) -> None:
    """Beyond 20 sources a source costs 5 series (its state counts), not 40 per subscription."""
    small = forwarder_series(make(fleets, tmp_path, 40).scrape())
    large = forwarder_series(make(fleets, tmp_path, 80).scrape())
    assert len(large) - len(small) == 40 * len(State)
    # The rest is per event: the same for 40 or 80 sources.
    assert len(small) - 40 * len(State) < 40 * len(SENT_EVENTS)
    per_source = {"forwarder_subscriptions", "forwarder_token_expiry_timestamp_seconds"}
    for name, labels in small:
        if name not in per_source and name != "forwarder_subscription_problem":
            assert "source" not in dict(labels), name


def test_counters_are_summed_per_event_and_the_series_do_not_grow_with_traffic(
    fleets: list[Fleet], tmp_path: Path
) -> None:
    """Traffic changes values, never the series: received and latency are sums per event."""
    fleet = make(fleets, tmp_path, 30)
    before = fleet.scrape()
    for n, s in enumerate(fleet.stats):
        s.received += n
        s.forwarded += 1
        s.close_codes["1006"] += 2
        s.latency.observe(0.003)
        s.latency.observe(20.0)
    after = fleet.scrape()
    assert after.keys() == before.keys()
    upsert = [n for n, s in enumerate(fleet.stats) if s.event == "messages.upsert"]
    event = (("event", "messages.upsert"),)
    assert after[("forwarder_messages_received_total", event)] == sum(upsert)
    assert after[("forwarder_messages_forwarded_total", event)] == 30
    assert after[("forwarder_close_codes_total", (("code", "1006"), *event))] == 60
    assert after[("forwarder_forward_latency_seconds_count", event)] == 60
    bucket = (("event", "messages.upsert"), ("le", "0.005"))
    assert after[("forwarder_forward_latency_seconds_bucket", bucket)] == 30
    assert after[("forwarder_forward_latency_seconds_sum", event)] == pytest.approx(30 * 20.003)
    assert labels_of(after, "forwarder_forward_latency_seconds_bucket") == {("event", "le")}


def test_source_label_follows_the_setting_and_the_number_of_sources(
    fleets: list[Fleet], tmp_path: Path
) -> None:
    """auto: by source up to 20 sources; always and never override it."""
    assert source_labelled("auto", 20)
    assert not source_labelled("auto", 21)
    assert source_labelled("always", 500)
    assert not source_labelled("never", 1)
    few = make(fleets, tmp_path, 2).scrape()
    assert labels_of(few, "forwarder_messages_received_total") == {("event", "source")}
    assert labels_of(few, "forwarder_forward_latency_seconds_count") == {("event",)}
    assert (
        few[("forwarder_messages_received_total", (("event", "call.upsert"), ("source", "wa0001")))]
        == 0
    )
    never = make(fleets, tmp_path, 2, source_label="never").scrape()
    assert labels_of(never, "forwarder_messages_received_total") == {("event",)}


def test_subscriptions_are_counted_by_source_and_state(fleets: list[Fleet], tmp_path: Path) -> None:
    """forwarder_subscriptions{source,state} replaces one gauge per subscription."""
    fleet = make(fleets, tmp_path, 25)
    fleet.stats[0].state = State.BACKOFF
    fleet.stats[1].state = State.CONNECTING
    fleet.stats[2].configured = False  # a spool leftover is not a subscription
    m = fleet.scrape()

    def count(source: str, state: str) -> float:
        return m[("forwarder_subscriptions", (("source", source), ("state", state)))]

    assert count("wa0000", "connected") == 10
    assert count("wa0000", "backoff") == 1
    assert count("wa0000", "connecting") == 1
    assert count("wa0000", "stopped") == 0
    assert count("wa0024", "connected") == 13
    assert ("forwarder_connected", (("event", "call.upsert"),)) not in m


def test_problem_series_name_exactly_the_unhealthy_subscriptions(
    fleets: list[Fleet], tmp_path: Path
) -> None:
    """Down, auth and stalled subscriptions get one series per problem; healthy ones none."""
    fleet = make(fleets, tmp_path, 40)
    by_name = {(s.source, s.event): s for s in fleet.stats}
    down = by_name[("wa0007", "chats.update")]
    down.state = State.BACKOFF
    down.last_handshake_status = "401"
    by_name[("wa0031", "messages.upsert")].last_message_at = NOW - 901  # over 900 s
    by_name[("wa0031", "call.upsert")].last_message_at = NOW - 86400  # never stalls
    m = fleet.scrape()
    problems = {
        dict(labels)["source"] + "/" + dict(labels)["event"] + ":" + dict(labels)["problem"]
        for name, labels in m
        if name == "forwarder_subscription_problem"
    }
    assert problems == {
        "wa0007/chats.update:down",
        "wa0007/chats.update:auth",
        "wa0031/messages.upsert:stalled",
    }
    totals = {
        dict(labels)["problem"]: value
        for (name, labels), value in m.items()
        if name == "forwarder_subscription_problems"
    }
    assert totals == {**dict.fromkeys(PROBLEMS, 0.0), "down": 1, "auth": 1, "stalled": 1}


def test_problem_series_are_capped_and_stable_while_the_count_says_all(
    fleets: list[Fleet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mass outage exports at most PROBLEM_SERIES_MAX series, the same ones each scrape."""
    monkeypatch.setattr(metrics, "PROBLEM_SERIES_MAX", 5)
    fleet = make(fleets, tmp_path, 30)
    for s in fleet.stats[:20]:
        s.state = State.CONNECTING
    first = fleet.scrape()
    named = {k for k in first if k[0] == "forwarder_subscription_problem"}
    assert len(named) == 5
    assert {k for k in fleet.scrape() if k[0] == "forwarder_subscription_problem"} == named
    assert first[("forwarder_subscription_problems", (("problem", "down"),))] == 20


# -- detail "subscription" ----------------------------------------------------------------


def test_subscription_detail_keeps_every_series_per_subscription(
    fleets: list[Fleet], tmp_path: Path
) -> None:
    """detail = "subscription": the documented number of series per subscription, all of
    them labelled source and event (the histogram included), plus forwarder_connected."""
    one = forwarder_series(
        make(fleets, tmp_path, 1, events=("messages.upsert",), detail="subscription").scrape()
    )
    two = forwarder_series(
        make(
            fleets, tmp_path, 1, events=("messages.upsert", "call.upsert"), detail="subscription"
        ).scrape()
    )
    assert len(two) - len(one) == SERIES_PER_SUBSCRIPTION
    assert labels_of(one, "forwarder_forward_latency_seconds_bucket") == {("event", "le", "source")}
    assert one[("forwarder_connected", (("event", "messages.upsert"), ("source", "wa0000")))] == 1
    readme = (ROOT / "README.md").read_text()
    assert f"{SERIES_PER_SUBSCRIPTION} series per subscription" in readme


def test_two_stats_of_one_subscription_are_one_series(fleets: list[Fleet], tmp_path: Path) -> None:
    """A reload that changed a subscription's stream leaves two stats for one (source, event):
    the exposition still has one series each (a duplicate would fail the whole scrape)."""
    fleet = make(fleets, tmp_path, 1, events=("messages.upsert",), detail="subscription")
    old = fleet.stats[0]
    old.configured = False
    old.forwarded = 5
    new = SubscriptionStats(old.source, old.event, "renamed:stream")
    new.state = State.CONNECTED
    new.forwarded = 2
    fleet.stats.append(new)
    m = fleet.scrape()  # asserts there is no duplicate
    labels = (("event", "messages.upsert"), ("source", "wa0000"))
    assert m[("forwarder_messages_forwarded_total", labels)] == 7
    assert m[("forwarder_connected", labels)] == 1


# -- concurrency --------------------------------------------------------------------------


def test_scrapes_while_counters_move_and_a_reload_grows_the_list(
    fleets: list[Fleet], tmp_path: Path
) -> None:
    """Scrapes never fail and counters never go back while a thread bumps counters and
    appends subscriptions (what a reload does) without any lock."""
    fleet = make(fleets, tmp_path, 25)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set() and n < 200_000:
            s = fleet.stats[n % len(fleet.stats)]
            s.received += 1
            s.latency.observe(0.001)
            if n % 5000 == 0:
                fleet.stats.append(SubscriptionStats(f"new{n}", "messages.upsert", f"new{n}"))
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = 0.0
        for _ in range(15):
            m = fleet.scrape()
            total = sum(
                v for (name, _), v in m.items() if name == "forwarder_messages_received_total"
            )
            assert total >= seen
            seen = total
    finally:
        stop.set()
        thread.join(10)
    assert seen > 0

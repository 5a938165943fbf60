"""The desired set: static sources and discovered instances merged, conflicts, the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from forwarder.config import (
    Config,
    RedisConfig,
    Secret,
    SourceConfig,
    Subscription,
    TokenCell,
    TokenRef,
)
from forwarder.desired import (
    desired,
    discovered_source,
    plan,
    removed_gap,
    same_connection,
)
from forwarder.discovery import Discovered
from forwarder.discovery_config import DiscoveryConfig, KeyRef
from forwarder.events import SENT_EVENTS
from forwarder.spool import GAP
from forwarder_sim import mint_token
from tests.conftest import SECRET


def table(name: str = "srv", **kwargs: Any) -> DiscoveryConfig:
    return DiscoveryConfig(
        name=name,
        api_url="http://127.0.0.1:9",
        api_key=KeyRef(value=Secret("k"), origin="test"),
        ws_url="ws://127.0.0.1:9/ws/events",
        **kwargs,
    )


def found(name: str, t: DiscoveryConfig | None = None) -> Discovered:
    return Discovered(t or table(), name, TokenCell(Secret(mint_token(name, SECRET))))


def static(name: str, events: tuple[str, ...] = ("messages.upsert",)) -> SourceConfig:
    token = TokenRef(value=Secret(mint_token(name, SECRET)), origin="test")
    return SourceConfig(name, "ws://127.0.0.1:9/ws/events", token, events=events)


def config(*sources: SourceConfig, redis: RedisConfig | None = None) -> Config:
    return Config(sources=sources, redis=redis or RedisConfig(), path=Path("x.toml"))


def test_a_discovered_instance_becomes_a_source_named_after_it() -> None:
    """Name, ws_url, the table's events and fan-in stream; the token is read from the cell."""
    f = found("acme")
    source = discovered_source(f)
    assert (source.name, source.url, source.events) == ("acme", f.table.ws_url, SENT_EVENTS)
    assert source.stream_for("messages.upsert") == "messages.upsert"
    assert source.token.read() == f.cell.get()
    new = Secret(mint_token("acme", SECRET))
    f.cell.set(new)
    assert source.token.read() == new
    assert "Auth.token of instance acme" in source.token.origin


def test_static_and_discovered_subscriptions_are_merged_in_order() -> None:
    """Static first, then each instance's events; both may write the same stream (fan-in)."""
    result = desired(config(static("main")), [found("a"), found("b")])
    keys = list(result.subscriptions)
    assert keys[0] == ("main", "messages.upsert")
    assert keys[1:14] == [("a", e) for e in SENT_EVENTS]
    assert len(keys) == 1 + 2 * 13
    streams = {s.stream for k, s in result.subscriptions.items() if k[1] == "messages.upsert"}
    assert streams == {"messages.upsert"}
    assert result.refused == ()


def test_a_name_taken_by_a_static_source_is_refused_and_the_static_one_stays() -> None:
    """Clash with [[sources]]: the discovered instance is refused with the reason."""
    result = desired(config(static("main")), [found("main"), found("x")])
    assert (
        result.subscriptions[("main", "messages.upsert")].source.url == "ws://127.0.0.1:9/ws/events"
    )
    assert ("main", "call.upsert") not in result.subscriptions
    ((t, name, reason),) = result.refused
    assert (t, name) == ("srv", "main")
    assert "name clash" in reason
    assert "[[sources]]" in reason
    assert ("x", "call.upsert") in result.subscriptions


def test_between_two_discovery_tables_the_first_keeps_the_name() -> None:
    """The same instance name from two servers: the earlier table wins, deterministically."""
    first, second = table("one"), table("two", events=("call.upsert",))
    result = desired(config(), [found("a", first), found("a", second)])
    assert result.subscriptions[("a", "messages.upsert")].source.url == first.ws_url
    assert [(t, n) for t, n, _ in result.refused] == [("two", "a")]
    assert "discovery one" in result.refused[0][2]


def test_a_discovered_stream_that_is_a_dead_letter_key_is_refused() -> None:
    """Streams "{event}:dlq" collide with the static source's dead-letter stream: refused."""
    bad = table("bad", stream="{event}:dlq")
    result = desired(config(static("main")), [found("a", bad)])
    assert list(result.subscriptions) == [("main", "messages.upsert")]
    ((_, name, reason),) = result.refused
    assert name == "a"
    assert "'messages.upsert:dlq'" in reason


def test_plan_starts_missing_stops_gone_keeps_unchanged() -> None:
    """Three instances running, one gone, one new, one kept: the plan says exactly that."""
    a, b, c = found("a"), found("b"), found("c")
    running = desired(config(), [a, b]).subscriptions
    wanted = desired(config(), [a, c]).subscriptions
    steps = plan(running, wanted)
    assert set(steps.keep) == {("a", e) for e in SENT_EVENTS}
    assert set(steps.stop) == {("b", e) for e in SENT_EVENTS}
    assert {s.key for s in steps.start} == {("c", e) for e in SENT_EVENTS}
    assert set(steps.gone) == set(steps.stop)


def test_a_new_token_in_the_cell_keeps_every_subscription() -> None:
    """Rotation changes nothing the plan sees: no stop, no start."""
    a = found("a")
    running = desired(config(), [a]).subscriptions
    a.cell.set(Secret(mint_token("a", SECRET)))
    steps = plan(running, desired(config(), [a]).subscriptions)
    assert steps.start == ()
    assert steps.stop == ()
    assert len(steps.keep) == 13


def test_a_changed_setting_restarts_and_an_added_event_starts_alone() -> None:
    """A new ws_url restarts (stop and start, not gone); one more event starts only itself."""
    one = table(events=("call.upsert",))
    two = table(events=("call.upsert", "messages.upsert"))
    cell = TokenCell(Secret(mint_token("a", SECRET)))
    running = desired(config(), [Discovered(one, "a", cell)]).subscriptions
    grown = plan(running, desired(config(), [Discovered(two, "a", cell)]).subscriptions)
    assert grown.keep == (("a", "call.upsert"),)
    assert [s.key for s in grown.start] == [("a", "messages.upsert")]
    moved = DiscoveryConfig(
        name="srv",
        api_url=one.api_url,
        api_key=one.api_key,
        ws_url="ws://127.0.0.2:9/ws/events",
        events=one.events,
    )
    restarted = plan(running, desired(config(), [Discovered(moved, "a", cell)]).subscriptions)
    assert restarted.stop == (("a", "call.upsert"),)
    assert [s.key for s in restarted.start] == [("a", "call.upsert")]
    assert restarted.gone == ()


def test_same_connection_ignores_only_the_events_list() -> None:
    """Other events of the source do not matter; the token and the stream do."""
    token = TokenRef(value=Secret(mint_token("m", SECRET)), origin="test")
    url = "ws://127.0.0.1:9/ws/events"

    def sub(
        events: tuple[str, ...], stream: str = "{event}", tok: TokenRef = token
    ) -> Subscription:
        source = SourceConfig("m", url, tok, events=events, stream=stream)
        return desired(config(source), []).subscriptions[("m", "call.upsert")]

    a = sub(("call.upsert",))
    assert same_connection(sub(("call.upsert", "chats.upsert")), a)
    assert not same_connection(None, a)
    assert not same_connection(sub(("call.upsert",), "{source}:{event}"), a)
    other = TokenRef(value=Secret(mint_token("m", SECRET)), origin="test")
    assert not same_connection(sub(("call.upsert",), tok=other), a)


def test_removed_gap_is_a_last_record_with_cause_removed() -> None:
    """The record: a zero-length, never-recovered interval at the removal time."""
    entry = removed_gap(7, 1_700_000_000.25, "instance no longer listed by discovery")
    assert (entry.subscription, entry.opcode, entry.received_at) == (7, GAP, 1_700_000_000.25)
    assert isinstance(entry.payload, bytes)
    assert orjson.loads(entry.payload) == {
        "start": 1_700_000_000_250,
        "end": 1_700_000_000_250,
        "cause": "removed",
        "recovered": 0,
        "attempts": 0,
        "detail": "instance no longer listed by discovery",
    }

"""The desired set of subscriptions, computed in one place, and the plan to reach it.

Inputs: the static `[[sources]]` of the configuration and the instances discovery currently
lists (a later fleet mode adds a third: what this member owns). `desired()` turns them into
one `{(source, event): Subscription}` map; `plan()` compares it with what runs: start what
is missing, stop what is gone, keep what is unchanged (a changed subscription is stopped
and started). A SIGHUP reload and a discovery poll are the same operation with different
inputs; the daemon applies the plan.

Conflicts are decided here, deterministically: a static source always wins a name; between
two discovery tables the earlier one wins; a discovered instance whose streams would put
one key in two roles (see config.StreamRoles) is refused. Refused instances are reported,
never half-subscribed.

Pure functions, no I/O, no threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import orjson

from forwarder.config import (
    Config,
    RedisConfig,
    SourceConfig,
    StreamRoles,
    Subscription,
    TokenRef,
)
from forwarder.discovery import Discovered
from forwarder.spool import GAP, Entry

Key = tuple[str, str]  # (source name, event)


@dataclass(frozen=True)
class Desired:
    """The subscriptions wanted, in order, and the discovered instances refused (table,
    instance, reason)."""

    subscriptions: dict[Key, Subscription]
    refused: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    """How to get from what runs to what is wanted."""

    start: tuple[Subscription, ...]  # new, or changed (then also in `stop`)
    stop: tuple[Key, ...]  # gone, or changed
    keep: tuple[Key, ...]

    @property
    def gone(self) -> tuple[Key, ...]:
        """Stopped and not started again: these get a `removed` gap record."""
        restarted = {sub.key for sub in self.start}
        return tuple(k for k in self.stop if k not in restarted)


def discovered_source(found: Discovered) -> SourceConfig:
    """The source of a discovered instance: named after it, its token live in `found.cell`.

    Settings not in [[discovery]] take the [[sources]] defaults. The same cell gives an equal
    SourceConfig poll after poll, so a new token never restarts a subscription.
    """
    table = found.table
    tls = table.ws_url.startswith("wss:")
    return SourceConfig(
        name=found.name,
        url=table.ws_url,
        token=TokenRef(
            origin=f"Auth.token of instance {found.name} (discovery {table.name})",
            cell=found.cell,
        ),
        events=table.events,
        stream=table.stream,
        ca_file=table.ca_file if tls else None,
        client_cert=table.client_cert if tls else None,
        client_key=table.client_key if tls else None,
    )


def subscriptions_of(source: SourceConfig, redis: RedisConfig) -> list[Subscription]:
    """A source's subscriptions, as Config.subscriptions() builds them for static sources."""
    subs = []
    for event in source.events:
        stream = source.stream_for(event)
        dlq = redis.dead_letter_stream.format(stream=stream, source=source.name, event=event)
        subs.append(Subscription(source, event, stream, dlq))
    return subs


def desired(config: Config, discovered: Iterable[Discovered]) -> Desired:
    """Every subscription wanted now: static sources first, then discovered instances."""
    wanted: dict[Key, Subscription] = {}
    static = config.subscriptions()
    roles = StreamRoles(config.redis.gap_stream)
    roles.add(static)  # load_config() refused static conflicts already
    owner: dict[str, str] = {}  # source name -> what defines it
    for sub in static:
        wanted[sub.key] = sub
        owner[sub.source.name] = "[[sources]]"
    refused: list[tuple[str, str, str]] = []
    for found in discovered:
        table = found.table.name
        taken = owner.get(found.name)
        if taken is not None:
            refused.append(
                (
                    table,
                    found.name,
                    f"the name is already a source of {taken}: a name clash; exclude it "
                    "from one of them (exclude = [...]) or rename the static source",
                )
            )
            continue
        subs = subscriptions_of(discovered_source(found), config.redis)
        problem = roles.conflict(subs)
        if problem is not None:
            refused.append((table, found.name, problem))
            continue
        roles.add(subs)
        owner[found.name] = f"discovery {table}"
        for sub in subs:
            wanted[sub.key] = sub
    return Desired(wanted, tuple(refused))


def same_connection(new: Subscription | None, old: Subscription) -> bool:
    """Whether this subscription's connection can stay as it is.

    The source's `events` list is not part of it: adding an event to a source must not
    reconnect the source's other events.
    """
    if new is None:
        return False
    if new == old:  # the common case, without building copies (a poll may compare 10,000)
        return True
    return replace(new, source=replace(new.source, events=())) == replace(
        old, source=replace(old.source, events=())
    )


def plan(running: Mapping[Key, Subscription], wanted: Mapping[Key, Subscription]) -> Plan:
    """Start what is missing, stop what is gone, keep what is unchanged."""
    keep = tuple(k for k, sub in running.items() if same_connection(wanted.get(k), sub))
    kept = set(keep)
    stop = tuple(k for k in running if k not in kept)
    start = tuple(sub for k, sub in wanted.items() if k not in kept)
    return Plan(start=start, stop=stop, keep=keep)


def removed_gap(route_index: int, at: float, detail: str) -> Entry:
    """The gap record closing a subscription that left the desired set (cause `removed`).

    A zero-length interval at `at` (unix time) that never recovers: from here on nothing of
    this (source, event) is received. Written after the subscriber stopped, so it is the
    subscription's last gap record.
    """
    record = {
        "start": int(at * 1000),
        "end": int(at * 1000),
        "cause": "removed",
        "recovered": 0,
        "attempts": 0,
        "detail": detail[:200],
    }
    return Entry(route_index, GAP, orjson.dumps(record), at)

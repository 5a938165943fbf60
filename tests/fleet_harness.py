"""Test stand-ins for what phase 2 wires: the upstream's slots, a daemon that obeys the
fleet directives, and a World of members on one fake clock.

`Upstream` keeps the server's rule (docs/fleet.md, from the upstream protocol): one slot per
subscription, the newest connection wins it silently, and a closed connection leaves the
slot pointing at nothing until someone connects again. `Obedient` applies a member's
directives the way the daemon will: connect on Acquired/ConnectAsSuccessor (asking
may_connect first, as the subscriber will), close on CloseHandedOver/StopNow, report
connected/closed back. Every connect is checked against may_connect, so a test fails if a
member ever connects to a subscription it may not run.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from forwarder.fleet.config import FleetConfig
from forwarder.fleet.directives import (
    Acquired,
    CloseHandedOver,
    ConnectAsSuccessor,
    Directive,
    PermissionChanged,
    Promoted,
    Resubscribe,
    StopNow,
    Takeover,
)
from forwarder.fleet.keys import Key
from forwarder.fleet.member import FleetMember
from forwarder.fleet.runner import FleetThread
from tests.fleet_model import FakeClock, ModelRedis, ModelStore

_ids = itertools.count(1)


@dataclass
class Upstream:
    """The server's slot map: newest connection wins, the loser is not told."""

    slots: dict[Key, int] = field(default_factory=dict)  # key -> connection id
    alive: dict[int, tuple[str, Key]] = field(default_factory=dict)  # id -> (member, key)
    connects: list[tuple[str, Key]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # members' threads share it

    def connect(self, member: str, key: Key) -> int:
        with self.lock:
            conn = next(_ids)
            self.alive[conn] = (member, key)
            self.slots[key] = conn
            self.connects.append((member, key))
            return conn

    def close(self, conn: int) -> None:
        with self.lock:
            self.alive.pop(conn, None)

    def feed(self, key: Key) -> str | None:
        """The member whose live connection receives `key`'s frames (None: nobody)."""
        with self.lock:
            conn = self.slots.get(key)
            if conn is None or conn not in self.alive:
                return None
            return self.alive[conn][0]


class Obedient:
    """Applies one member's directives to the Upstream, as the daemon will in phase 2."""

    def __init__(self, member: FleetMember, upstream: Upstream) -> None:
        self.member = member
        self.upstream = upstream
        self.conns: dict[Key, list[int]] = {}
        self.takeovers: dict[Key, Takeover | None] = {}
        self.stops: list[tuple[Key, str]] = []
        self.resubscribes: list[Resubscribe] = []
        self.seen: list[Directive] = []
        self.connect_successors = True  # False: a target that never manages to connect
        self.slow_successors = False  # True: the successor's handshake takes until next round
        self.report_closed = True
        self._pending: list[Key] = []

    def apply(self, directives: Sequence[Directive]) -> None:
        pending, self._pending = self._pending, []
        for key in pending:
            self._successor_connect(key)
        for d in directives:
            self.seen.append(d)
            if isinstance(d, Acquired):
                self.takeovers[d.key] = d.takeover
                self._connect(d.key)
            elif isinstance(d, ConnectAsSuccessor):
                if self.slow_successors:
                    self._pending.append(d.key)
                else:
                    self._successor_connect(d.key)
            elif isinstance(d, Promoted):
                if d.takeover is not None:
                    self.takeovers[d.key] = d.takeover
            elif isinstance(d, CloseHandedOver):
                self._close(d.key)
                if self.report_closed:
                    self.member.closed(d.key)
            elif isinstance(d, StopNow):
                self.stops.append((d.key, d.reason))
                self._close(d.key)
            elif isinstance(d, Resubscribe):
                self.resubscribes.append(d)
            elif isinstance(d, PermissionChanged) and not self.conns.get(d.key):
                self._connect(d.key)

    def _successor_connect(self, key: Key) -> None:
        if self.connect_successors and self._connect(key):
            self.member.connected(key)

    def due_resubscribes(self, now: float) -> None:
        """Make-before-break re-subscribes whose time has come."""
        for r in [r for r in self.resubscribes if r.not_before <= now]:
            self.resubscribes.remove(r)
            if self.conns.get(r.key) and self.member.may_connect(r.key):
                old = list(self.conns[r.key])
                self._connect(r.key, force=True)
                for conn in old:
                    self.upstream.close(conn)
                    self.conns[r.key].remove(conn)

    def _connect(self, key: Key, force: bool = False) -> bool:
        if not self.member.may_connect(key):
            return False
        if self.conns.get(key) and not force:
            return True
        conn = self.upstream.connect(self.member.name, key)
        self.conns.setdefault(key, []).append(conn)
        return True

    def _close(self, key: Key) -> None:
        for conn in self.conns.pop(key, []):
            self.upstream.close(conn)

    def die(self) -> None:
        """kill -9: every connection drops (the slots keep pointing at them)."""
        for key in list(self.conns):
            self._close(key)

    @property
    def connected_keys(self) -> set[Key]:
        return {k for k, conns in self.conns.items() if conns}


def owners(members: Sequence[FleetMember]) -> dict[Key, list[str]]:
    """{key: [members that run it as lease holder]}, from each member's own view: owned,
    deadline ahead, not being handed over (a holder that has handed over may still think
    it owns the lease until its next renewal, but it no longer connects)."""
    out: dict[Key, list[str]] = {}
    for m in members:
        for key in m.runnable() & m.owned():
            out.setdefault(key, []).append(m.name)
    return out


def keys(n: int, source: str = "main") -> list[Key]:
    return [(f"{source}{i // 10}", f"event.{i % 10}") for i in range(n)]


CONFIG = FleetConfig(enabled=True, lease_ttl=10.0, renew_interval=10 / 3, margin=2.0)


class World:
    def __init__(self, config: FleetConfig = CONFIG) -> None:
        self.config = config
        self.clock = FakeClock()
        self.redis = ModelRedis(self.clock)
        self.upstream = Upstream()
        self.members: dict[str, FleetMember] = {}
        self.threads: dict[str, FleetThread] = {}
        self.stores: dict[str, ModelStore] = {}
        self.daemons: dict[str, Obedient] = {}
        self.paused: set[str] = set()
        self.candidates: list[Key] = []
        self.blind: dict[Key, int] = {}  # checks at which an owned key had no feed
        self.double: list[tuple[Key, list[str]]] = []

    def add(self, name: str, candidates: list[Key] | None = None) -> FleetMember:
        member = FleetMember(self.config, self.clock, name=name, incarnation=f"{name}-1")
        member.set_candidates(self.candidates if candidates is None else candidates)
        self.members[name] = member
        self.stores[name] = ModelStore(self.redis, self.config)
        self.threads[name] = FleetThread(member, self.stores[name])
        self.daemons[name] = Obedient(member, self.upstream)
        return member

    def round(self, name: str) -> None:
        directives = self.threads[name].run_round()
        self.daemons[name].apply(directives)
        self.daemons[name].due_resubscribes(self.clock.monotonic())
        self.check()

    def step(self, seconds: float = 10 / 3, rounds: int = 1) -> None:
        """Advance the clock, then let every running member do `rounds` rounds."""
        self.clock.advance(seconds)
        for _ in range(rounds):
            for name in list(self.members):
                if name not in self.paused:
                    self.round(name)

    def settle(self, steps: int = 12, seconds: float = 10 / 3) -> None:
        for _ in range(steps):
            self.step(seconds, rounds=3)

    def check(self) -> None:
        live = [m for n, m in self.members.items() if n not in self.paused]
        for key, holders in owners(list(self.members.values())).items():
            if len(holders) > 1:
                self.double.append((key, holders))
        for m in live:
            for key in m.owned():
                if self.upstream.feed(key) is None:
                    self.blind[key] = self.blind.get(key, 0) + 1

    def owner_of(self, key: Key) -> list[str]:
        return owners(list(self.members.values())).get(key, [])


def alone(world: World, candidates: list[Key] | None = None) -> FleetMember:
    """Member "a" alone, past the first epoch's quiet period, holding every candidate."""
    a = world.add("a", candidates)
    world.step(0.0)
    world.step(CONFIG.lease_ttl)
    assert a.owned() == frozenset(world.candidates if candidates is None else candidates)
    return a

"""Real `forwarder run` processes in one fleet group, for tests/test_fleet_processes.py and
the fleet soak (bench/soak_fleet.py): configuration files, start, SIGTERM, kill -9,
SIGSTOP, /status and /readyz, and the oracle that compares what the simulator delivered
with what is in Redis.

Every process is started here and only those PIDs are signalled. All traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from forwarder_sim import Simulator, mint_token
from forwarder_sim.payloads import seq_of
from tests.helpers import free_port, wait_for

Slot = tuple[str, str]  # (instance = source name, event)


def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """wait_for every 50 ms: the fleet's predicates ask several processes over HTTP."""
    wait_for(predicate, timeout, what, every=0.05)


@dataclass
class Member:
    """One `forwarder run` process of the fleet (restartable under the same name)."""

    name: str
    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of one of the member's endpoints; (0, {}) if it does not
        answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, cast(dict[str, Any], json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, cast(dict[str, Any], json.loads(exc.read()))
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def fleet(self) -> dict[str, Any]:
        """The "fleet" section of /status ({} while the process does not answer)."""
        return cast(dict[str, Any], self.get("/status")[1].get("fleet", {}))

    def owned(self) -> set[str]:
        """`source/event` of the leases this member runs as owner."""
        return {
            lease["subscription"]
            for lease in self.fleet().get("leases", [])
            if lease["role"] == "owner" and not lease["closing"]
        }

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Fleet:
    """Members sharing `sources` x `events` of one simulator, writing to one Redis."""

    workdir: Path
    sim: Simulator
    redis_url: str
    sources: list[str]
    events: list[str]
    secret: str
    lease_ttl: float = 3.0
    shutdown_timeout: float = 10.0
    members: dict[str, Member] = field(default_factory=dict)

    @property
    def slots(self) -> list[Slot]:
        return [(s, e) for s in self.sources for e in self.events]

    def _tokens(self) -> dict[str, Path]:
        paths = {}
        for source in self.sources:
            path = self.workdir / f"{source}.token"
            if not path.exists():
                path.write_text(mint_token(source, self.secret) + "\n")
            paths[source] = path
        return paths

    def add(self, name: str) -> Member:
        """Write the configuration of a member (its own spool and metrics port)."""
        tokens = self._tokens()
        events = ", ".join(f'"{e}"' for e in self.events)
        ttl = self.lease_ttl
        port = free_port()
        parts = [
            f"shutdown_timeout = {self.shutdown_timeout}",
            "[spool]",
            f'dir = "{self.workdir / name / "spool"}"',
            "[redis]",
            f'url = "{self.redis_url}"',
            "socket_timeout = 1.0",
            "[metrics]",
            f'listen = "127.0.0.1:{port}"',
            "[fleet]",
            "enabled = true",
            f'name = "{name}"',
            f"lease_ttl = {ttl}",
            f"renew_interval = {ttl / 3:.3f}",
            f"margin = {ttl / 5:.3f}",
            "handover_timeout = 10.0",
        ]
        for source in self.sources:
            parts += [
                "[[sources]]",
                f'name = "{source}"',
                f'url = "{self.sim.url}"',
                f'token_file = "{tokens[source]}"',
                f"events = [{events}]",
                'stream = "{source}:{event}"',
                "connect_timeout = 1.0",
                "backoff = { initial = 0.05, maximum = 0.5 }",
            ]
        (self.workdir / name).mkdir(parents=True, exist_ok=True)
        config = self.workdir / name / "forwarder.toml"
        config.write_text("\n".join(parts) + "\n")
        member = Member(name, config, port, self.workdir / name / "forwarder.log")
        self.members[name] = member
        return member

    def start(self, name: str) -> Member:
        member = self.members.get(name) or self.add(name)
        assert not member.alive, f"{name} runs already"
        with member.log.open("ab") as out:
            member.proc = subprocess.Popen(
                [sys.executable, "-m", "forwarder", "run", "--config", str(member.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "FORWARDER_LOG_LEVEL": "INFO"},
            )
        member.starts += 1
        return member

    def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        member = self.members[name]
        poll(lambda: member.ready() or not member.alive, timeout, f"{name} ready")
        assert member.alive, f"{name} exited: {self.tail(name)}"

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit; returns the exit code."""
        member = self.members[name]
        assert member.proc is not None
        member.proc.send_signal(signal.SIGTERM)
        code = member.proc.wait(timeout)
        member.proc = None
        return code

    def kill(self, name: str) -> None:
        member = self.members[name]
        assert member.proc is not None
        member.proc.kill()
        member.proc.wait(10)
        member.proc = None

    def pause(self, name: str) -> None:
        proc = self.members[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        proc = self.members[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill whatever still runs (the checks are done by then; a shutdown of every
        member at once only waits for handovers nobody can take)."""
        for member in self.members.values():
            proc = member.proc
            if proc is not None and proc.poll() is None:
                proc.kill()
        for member in self.members.values():
            if member.proc is not None:
                member.proc.wait(10)
            member.proc = None

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            text = self.members[name].log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- traffic and the simulator's view ---------------------------------------------------

    def traffic(self, rate: float) -> None:
        for source, event in self.slots:
            self.sim.set_rate(event, rate, instance=source)

    def slot_stats(self) -> dict[Slot, dict[str, Any]]:
        slots = self.sim.stats()["slots"]
        return {(s, e): slots.get(s, {}).get(e, {}) for s, e in self.slots}

    def all_held(self) -> bool:
        """Every slot's newest connection is open (someone receives its feed)."""
        return all(v.get("holder_open") for v in self.slot_stats().values())

    def open_per_slot(self) -> dict[Slot, int]:
        """Open WebSocket connections per slot (holders and displaced ones alike)."""
        counts: Counter[Slot] = Counter()
        for conn in self.sim.stats()["connections"].values():
            if conn["open"]:
                counts[(conn["instance"], conn["event"])] += 1
        return {slot: counts[slot] for slot in self.slots}

    def owners(self, skip: Iterable[str] = ()) -> dict[str, set[str]]:
        """Per running member (but `skip`), the subscriptions it owns (from its /status)."""
        left_out = set(skip)
        return {n: m.owned() for n, m in self.members.items() if m.alive and n not in left_out}

    def owned_once(self) -> bool:
        """Every subscription is owned by exactly one running member."""
        owned = Counter(k for keys in self.owners().values() for k in keys)
        want = {f"{s}/{e}" for s, e in self.slots}
        return set(owned) == want and all(n == 1 for n in owned.values())

    def settled(self) -> bool:
        return self.owned_once() and self.all_held()

    def connections(self) -> dict[Slot, int]:
        """Upgrades per slot so far (a slot that flaps keeps counting)."""
        return {k: int(v.get("connections", 0)) for k, v in self.slot_stats().items()}


@dataclass
class Oracle:
    """What the simulator delivered against what Redis holds, per slot, by sequence number."""

    lost: dict[Slot, list[int]]
    duplicated: dict[Slot, list[int]]
    delivered: int
    written: int
    dropped: int  # generated while no open connection held the slot (never delivered)

    @property
    def lost_total(self) -> int:
        return sum(len(v) for v in self.lost.values())

    @property
    def duplicated_total(self) -> int:
        return sum(len(v) for v in self.duplicated.values())


def stream_seqs(client: redis.Redis, slot: Slot) -> list[int]:
    source, event = slot
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(f"{source}:{event}"))
    return [seq_of(event, fields[b"data"]) for _, fields in entries]


def compare(sim: Simulator, client: redis.Redis, slots: Iterable[Slot]) -> Oracle:
    lost: dict[Slot, list[int]] = {}
    duplicated: dict[Slot, list[int]] = {}
    delivered = written = 0
    for slot in slots:
        sent = [seq_of(slot[1], f) for f in sim.delivered_frames(*slot)]
        got = stream_seqs(client, slot)
        delivered += len(sent)
        written += len(got)
        counts = Counter(got)
        dups = sorted(s for s, n in counts.items() if n > 1)
        missing = sorted(set(sent) - set(counts))
        if dups:
            duplicated[slot] = dups
        if missing:
            lost[slot] = missing
    dropped = int(sim.summary()["dropped"])
    return Oracle(lost, duplicated, delivered, written, dropped)


def settle_writes(sim: Simulator, client: redis.Redis, slots: list[Slot], timeout: float) -> None:
    """Wait until Redis holds at least what the simulator delivered (or the timeout)."""

    def caught_up() -> bool:
        return all(len(set(stream_seqs(client, s))) >= len(sim.delivered_frames(*s)) for s in slots)

    with contextlib.suppress(AssertionError):  # the caller's comparison says what is missing
        poll(caught_up, timeout, "every delivered frame in Redis")


def gap_records(client: redis.Redis, stream: str = "forwarder:gaps") -> list[dict[str, Any]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
    out = []
    for _, fields in entries:
        out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out

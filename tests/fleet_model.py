"""A model of RedisFleetStore on a fake clock, for the fast fleet tests.

It keeps the state the Lua scripts keep (forwarder/fleet/scripts.py) and applies the same
rules in Python, so FleetMember scenarios (expiry, pauses, outages, restarts) run in no
time. tests/test_fleet_store.py runs the same contract cases against this model and against
a real redis-server, so the model cannot drift from the scripts unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from forwarder.errors import FleetError
from forwarder.fleet.config import FleetConfig
from forwarder.fleet.keys import Key, Token, sub_id
from forwarder.fleet.protocol import (
    AcquireReply,
    AcquireStatus,
    ChangeReply,
    ChangeRequest,
    Handover,
    HeartbeatReply,
    HeartbeatRequest,
    LiveMember,
    MemberRecord,
    Previous,
    ReleaseStatus,
    RenewReply,
    RenewStatus,
)


class FakeClock:
    """Monotonic and wall time that move only when told (wall = 1.7e9 + monotonic)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class _Expiring:
    value: Any
    expires_ms: int | None


@dataclass
class ModelRedis:
    """The fleet's keys as plain Python state, with expiry on the clock."""

    clock: FakeClock
    epoch: int | None = None
    registry: dict[str, int] = field(default_factory=dict)  # name -> last beat ms
    member_keys: dict[str, _Expiring] = field(default_factory=dict)
    drain: dict[str, int] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    holders: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, _Expiring] = field(default_factory=dict)
    handovers: dict[str, _Expiring] = field(default_factory=dict)
    down: bool = False  # every call fails before doing anything

    def now_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    def flush(self) -> None:
        """What a restart without persistence does: forget everything."""
        self.epoch = None
        for table in (
            self.registry,
            self.member_keys,
            self.drain,
            self.fences,
            self.holders,
            self.leases,
            self.handovers,
        ):
            table.clear()

    def get(self, table: dict[str, _Expiring], key: str) -> Any:
        item = table.get(key)
        if item is None:
            return None
        if item.expires_ms is not None and item.expires_ms <= self.now_ms():
            del table[key]
            return None
        return item.value

    def put(self, table: dict[str, _Expiring], key: str, value: Any, ttl_ms: int) -> None:
        table[key] = _Expiring(value, self.now_ms() + ttl_ms)

    def pexpire(self, table: dict[str, _Expiring], key: str, ttl_ms: int) -> None:
        if self.get(table, key) is not None:
            table[key].expires_ms = self.now_ms() + ttl_ms

    def current_epoch(self) -> int:
        if self.epoch is None:
            self.epoch = self.now_ms()
        return self.epoch

    def holder(self, key: Key) -> str | None:
        """The token string holding the lease now (for assertions)."""
        value = self.get(self.leases, sub_id(key))
        return None if value is None else str(value)


def _member_of(token: str | None) -> tuple[str, str] | None:
    parsed = Token.parse(token) if token else None
    return None if parsed is None else (parsed.member, parsed.incarnation)


class ModelStore:
    """FleetStore on a ModelRedis: the rules of scripts.py, in Python."""

    def __init__(self, redis: ModelRedis, config: FleetConfig) -> None:
        self.redis = redis
        self._ttl = int(config.lease_ttl * 1000)
        self._handover = int(config.handover_timeout * 1000)
        self.calls = 0
        # The next call of each kind named here ("heartbeat", "change", "leave") is applied,
        # then fails as if its reply was lost on the way.
        self.lose_next: set[str] = set()

    def _enter(self) -> None:
        self.calls += 1
        if self.redis.down:
            raise FleetError("connection", "fleet: Redis is down (model)")

    def _leave_call(self, kind: str) -> None:
        if kind in self.lose_next:
            self.lose_next.discard(kind)
            raise FleetError("timeout", f"fleet {kind}: reply lost (model)")

    def _fresh(self) -> bool:
        r = self.redis
        return r.now_ms() - r.current_epoch() < self._ttl

    def _previous(self, sub: str) -> Previous | None:
        h = self.redis.holders.get(sub)
        if h is None:
            return None
        data = dict(h)
        owner = _member_of(data.get("token"))
        if owner is not None and owner[0] in self.redis.registry:
            data["beat"] = self.redis.registry[owner[0]]
        return Previous.from_json(json.dumps(data))

    def _hold(self, sub: str, token: str, via: str) -> None:
        self.redis.holders[sub] = {
            "token": token,
            "state": "held",
            "at": self.redis.now_ms(),
            "via": via,
        }

    # -- heartbeat ----------------------------------------------------------------------------

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatReply:
        self._enter()
        r = self.redis
        now = r.now_ms()
        epoch = r.current_epoch()
        record = request.record
        current = MemberRecord.from_json(r.get(r.member_keys, record.name))
        conflict = None
        if current is not None and current.incarnation != record.incarnation:
            conflict = current
        else:
            r.put(r.member_keys, record.name, record.to_json(), self._ttl)
            r.registry[record.name] = now
        renewals = tuple(self._renew(x.key, str(x.token), x.successor) for x in request.renewals)
        members = []
        for name, beat in sorted(r.registry.items()):
            rec = MemberRecord.from_json(r.get(r.member_keys, name))
            if beat >= now - self._ttl and rec is not None:
                members.append(LiveMember(rec, beat))
        reply = HeartbeatReply(
            server_ms=now,
            epoch_ms=epoch,
            members=tuple(members),
            renewals=renewals,
            drain_requested=record.name in r.drain,
            conflict=conflict,
        )
        self._leave_call("heartbeat")
        return reply

    def _renew(self, key: Key, token: str, successor: bool) -> RenewReply:
        r = self.redis
        sub = sub_id(key)
        fresh = self._fresh()
        cur = r.get(r.leases, sub)
        if cur == token:
            r.pexpire(r.leases, sub, self._ttl)
            status = RenewStatus.PROMOTED if successor else RenewStatus.HELD
            marker = r.get(r.handovers, sub)
            return RenewReply(key, status, handover=Handover.from_json(marker))
        if cur is None:
            if not successor and fresh:
                r.put(r.leases, sub, token, self._ttl)
                parsed = Token.parse(token)
                if parsed is not None and parsed.fence > r.fences.get(sub, 0):
                    r.fences[sub] = parsed.fence
                self._hold(sub, token, "reassert")
                return RenewReply(key, RenewStatus.REASSERTED)
            if successor:
                h = json.loads(r.get(r.handovers, sub) or "null")
                if h and h.get("successor") == token:
                    prev = self._previous(sub)
                    r.put(r.leases, sub, token, self._ttl)
                    self._hold(sub, token, "promoted")
                    r.handovers.pop(sub, None)
                    return RenewReply(key, RenewStatus.PROMOTED, previous=prev)
            return RenewReply(key, RenewStatus.LOST)
        if successor:
            raw = r.get(r.handovers, sub)
            h = json.loads(raw or "null")
            if h and h.get("successor") == token and h.get("from") == cur:
                r.pexpire(r.handovers, sub, self._ttl)
                return RenewReply(key, RenewStatus.SUCCESSOR, handover=Handover.from_json(raw))
        return RenewReply(key, RenewStatus.LOST, holder=Token.parse(cur))

    # -- changes ------------------------------------------------------------------------------

    def change(self, member: MemberRecord, request: ChangeRequest) -> ChangeReply:
        self._enter()
        reply = ChangeReply(acquired=tuple(self._acquire(member, k) for k in request.acquire))
        for ask in request.handovers:
            reply.handovers[ask.key] = self._request(ask.key, str(ask.token), ask.target)
        for key, token in request.connected:
            reply.connected[key] = self._connected(key, str(token))
        for key, token in request.release:
            reply.released[key] = self._release(key, str(token))
        for key, token in request.cancel:
            reply.cancelled[key] = self._cancel(key, str(token))
        self._leave_call("change")
        return reply

    def _acquire(self, member: MemberRecord, key: Key) -> AcquireReply:
        r = self.redis
        sub = sub_id(key)
        cur = r.get(r.leases, sub)
        me = (member.name, member.incarnation)
        if cur is None:
            if self._fresh():
                return AcquireReply(key, AcquireStatus.QUIET)
            r.fences[sub] = r.fences.get(sub, 0) + 1
            token = f"{r.fences[sub]} {member.name} {member.incarnation}"
            r.put(r.leases, sub, token, self._ttl)
            prev = self._previous(sub)
            self._hold(sub, token, "acquired")
            r.handovers.pop(sub, None)
            return AcquireReply(key, AcquireStatus.ACQUIRED, Token.parse(token), previous=prev)
        if _member_of(cur) == me:
            r.pexpire(r.leases, sub, self._ttl)
            return AcquireReply(key, AcquireStatus.ACQUIRED, Token.parse(cur))
        h = json.loads(r.get(r.handovers, sub) or "null")
        if h and h.get("to") == member.name and h.get("from") == cur:
            if _member_of(h.get("successor")) == me:
                r.pexpire(r.handovers, sub, self._ttl)
                return AcquireReply(key, AcquireStatus.CLAIMED, Token.parse(h["successor"]))
            if h.get("state") == "requested":
                r.fences[sub] = r.fences.get(sub, 0) + 1
                token = f"{r.fences[sub]} {member.name} {member.incarnation}"
                h.update(state="claimed", successor=token)
                r.put(r.handovers, sub, json.dumps(h), self._ttl)
                return AcquireReply(key, AcquireStatus.CLAIMED, Token.parse(token))
        return AcquireReply(key, AcquireStatus.HELD, holder=Token.parse(cur))

    def _request(self, key: Key, token: str, target: str) -> str:
        r = self.redis
        sub = sub_id(key)
        if r.get(r.leases, sub) != token:
            return "lost"
        h = json.loads(r.get(r.handovers, sub) or "null")
        if h and h.get("from") == token and (h["state"] != "requested" or h["to"] == target):
            return str(h["state"])
        marker = {"from": token, "to": target, "state": "requested", "at": r.now_ms()}
        r.put(r.handovers, sub, json.dumps(marker), self._handover)
        return "requested"

    def _connected(self, key: Key, token: str) -> bool:
        r = self.redis
        sub = sub_id(key)
        raw = r.get(r.handovers, sub)
        h = json.loads(raw or "null")
        if h and h.get("successor") == token:
            h["state"] = "connected"
            r.handovers[sub] = replace(r.handovers[sub], value=json.dumps(h))
            return True
        return False

    def _release(self, key: Key, token: str) -> ReleaseStatus:
        r = self.redis
        sub = sub_id(key)
        if r.get(r.leases, sub) != token:
            return ReleaseStatus.LOST
        h = json.loads(r.get(r.handovers, sub) or "null")
        if h and h.get("from") == token and h.get("state") == "connected" and h.get("successor"):
            r.put(r.leases, sub, h["successor"], self._ttl)
            self._hold(sub, h["successor"], "handover")
            r.handovers.pop(sub, None)
            return ReleaseStatus.HANDED
        r.leases.pop(sub, None)
        if h and h.get("from") == token:
            r.handovers.pop(sub, None)
        r.holders[sub] = {"token": token, "state": "released", "at": r.now_ms()}
        return ReleaseStatus.RELEASED

    def _cancel(self, key: Key, token: str) -> str:
        r = self.redis
        sub = sub_id(key)
        h = json.loads(r.get(r.handovers, sub) or "null")
        if h and h.get("from") == token:
            if h.get("state") == "connected":
                return "connected"
            r.handovers.pop(sub, None)
            return "cancelled"
        return "gone"

    def leave(self, member: MemberRecord) -> None:
        self._enter()
        r = self.redis
        current = MemberRecord.from_json(r.get(r.member_keys, member.name))
        if current is not None and current.incarnation != member.incarnation:
            return
        r.member_keys.pop(member.name, None)
        r.registry.pop(member.name, None)
        r.drain.pop(member.name, None)
        self._leave_call("leave")

"""RedisFleetStore: the fleet's requests as script calls (scripts.py) in pipelines.

A heartbeat round is two round trips (the heartbeat and every renewal pipelined, then the
live members' records); a change round is one. Long lists are cut into chunks of
`CHUNK` subscriptions per script call, so one call never blocks Redis for long.

redis-py errors become FleetError here; nothing above this module sees a redis exception.
Thread-safety: one store per fleet thread (redis-py clients are thread-safe; pipelines are
built per call).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis

from forwarder.config import RedisConfig
from forwarder.errors import FleetError
from forwarder.fleet import scripts
from forwarder.fleet.config import FleetConfig
from forwarder.fleet.keys import FleetKeys, Key, Token, parse_sub_id, sub_id
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
from forwarder.redis_target import make_client
from forwarder.sink import error_kind

CHUNK = 500  # subscriptions per script call
FORGET_AFTER_MS = 24 * 3600 * 1000  # a silent member's last heartbeat is kept this long

T = TypeVar("T")


def fleet_client(redis_config: RedisConfig, fleet: FleetConfig) -> redis.Redis:
    """A client for the fleet thread: the writer's settings, but a socket timeout within
    half the margin, so that a hung Redis cannot keep the thread from noticing a deadline."""
    timeout = min(redis_config.socket_timeout, fleet.margin / 2)
    return make_client(dataclasses.replace(redis_config, socket_timeout=timeout))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _opt(value: object) -> str | None:
    """A script's `false` arrives as None."""
    return None if value is None else _text(value)


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


@dataclass(frozen=True)
class LeaseView:
    """One lease as `forwarder fleet status` shows it."""

    key: Key
    token: Token | None
    ttl_ms: int
    handover: Handover | None


@dataclass(frozen=True)
class FleetSnapshot:
    """The group's state in Redis, read without changing it."""

    server_ms: int
    epoch_ms: int | None
    members: tuple[tuple[str, int, MemberRecord | None], ...]  # name, last beat, record
    drain: dict[str, int]  # member name -> when a drain was asked (server ms)
    leases: tuple[LeaseView, ...]


class RedisFleetStore:
    """FleetStore on a real Redis (single node; in a Cluster all keys share one slot)."""

    def __init__(self, client: redis.Redis, config: FleetConfig) -> None:
        self._client = client
        self._config = config
        self.keys = FleetKeys(config.group)
        self._ttl_ms = max(1, int(config.lease_ttl * 1000))
        self._handover_ms = max(1, int(config.handover_timeout * 1000))
        register = client.register_script
        self._heartbeat = register(scripts.HEARTBEAT)
        self._renew = register(scripts.RENEW)
        self._acquire = register(scripts.ACQUIRE)
        self._request = register(scripts.REQUEST_HANDOVER)
        self._connected = register(scripts.REPORT_CONNECTED)
        self._release = register(scripts.RELEASE)
        self._cancel = register(scripts.CANCEL_HANDOVER)
        self._leave = register(scripts.LEAVE)

    def _run(self, what: str, work: Callable[[], T]) -> T:
        try:
            return work()
        except redis.RedisError as exc:
            raise FleetError(error_kind(exc), f"fleet {what}: {exc}") from None
        except (ValueError, IndexError, TypeError) as exc:  # a reply of the wrong shape
            raise FleetError(
                "other", f"fleet {what}: unexpected reply from Redis ({exc})"
            ) from None

    def _common(self) -> list[str]:
        k = self.keys
        return [k.epoch, k.fences, k.holders, k.members]

    def _pair_keys(self, keys: Sequence[Key]) -> list[str]:
        out: list[str] = []
        for key in keys:
            out += [self.keys.lease(key), self.keys.handover(key)]
        return out

    # -- heartbeat round ----------------------------------------------------------------------

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatReply:
        return self._run("heartbeat", lambda: self._heartbeat_round(request))

    def _heartbeat_round(self, request: HeartbeatRequest) -> HeartbeatReply:
        record = request.record
        k = self.keys
        pipe = self._client.pipeline(transaction=False)
        self._heartbeat(
            keys=[k.epoch, k.members, k.member(record.name), k.drain],
            args=[
                record.name,
                record.incarnation,
                record.to_json(),
                self._ttl_ms,
                FORGET_AFTER_MS,
            ],
            client=pipe,
        )
        chunks = list(_chunks(request.renewals))
        for chunk in chunks:
            args: list[Any] = [self._ttl_ms, self._ttl_ms]
            for r in chunk:
                args += [sub_id(r.key), str(r.token), "s" if r.successor else "o"]
            self._renew(
                keys=self._common() + self._pair_keys([r.key for r in chunk]),
                args=args,
                client=pipe,
            )
        replies = pipe.execute()
        now, epoch, conflict, drain, ranked = replies[0]
        renewals: list[RenewReply] = []
        for chunk, reply in zip(chunks, replies[1:], strict=True):
            for i, r in enumerate(chunk):
                status, marker, holder, prev = reply[4 * i : 4 * i + 4]
                renewals.append(
                    RenewReply(
                        r.key,
                        RenewStatus(_text(status)),
                        handover=Handover.from_json(_opt(marker)),
                        holder=Token.parse(_text(holder)) if holder else None,
                        previous=Previous.from_json(_opt(prev)),
                    )
                )
        # Live members: a heartbeat within a lease_ttl, and their key still there.
        beats = {
            _text(ranked[i]): int(float(ranked[i + 1]))
            for i in range(0, len(ranked), 2)
            if int(float(ranked[i + 1])) >= int(now) - self._ttl_ms
        }
        names = sorted(beats)
        records = self._client.mget([k.member(n) for n in names]) if names else []
        members = tuple(
            LiveMember(rec, beats[name])
            for name, raw in zip(names, records, strict=True)
            if (rec := MemberRecord.from_json(raw)) is not None
        )
        return HeartbeatReply(
            server_ms=int(now),
            epoch_ms=int(epoch),
            members=members,
            renewals=tuple(renewals),
            drain_requested=bool(int(drain)),
            conflict=MemberRecord.from_json(_opt(conflict)) if conflict else None,
        )

    # -- change round -------------------------------------------------------------------------

    def change(self, member: MemberRecord, request: ChangeRequest) -> ChangeReply:
        return self._run("change", lambda: self._change_round(member, request))

    def _change_round(self, member: MemberRecord, request: ChangeRequest) -> ChangeReply:
        k = self.keys
        pipe = self._client.pipeline(transaction=False)
        reply = ChangeReply()
        acquired: list[AcquireReply] = []
        parsers: list[Callable[[Any], None]] = []  # one per script call, in pipeline order

        def parse_acquire(keys: Sequence[Key]) -> Callable[[Any], None]:
            def parse(result: Any) -> None:
                for i, key in enumerate(keys):
                    status, token, holder, prev = result[4 * i : 4 * i + 4]
                    acquired.append(
                        AcquireReply(
                            key,
                            AcquireStatus(_text(status)),
                            token=Token.parse(_text(token)) if token else None,
                            holder=Token.parse(_text(holder)) if holder else None,
                            previous=Previous.from_json(_opt(prev)),
                        )
                    )

            return parse

        def parse_each(
            keys: Sequence[Key], store: Callable[[Key, Any], None]
        ) -> Callable[[Any], None]:
            def parse(result: Any) -> None:
                for key, value in zip(keys, result, strict=True):
                    store(key, value)

            return parse

        for chunk in _chunks(request.acquire):
            args: list[str | int] = [member.name, member.incarnation, self._ttl_ms, self._ttl_ms]
            self._acquire(
                keys=self._common() + self._pair_keys(chunk),
                args=args + [sub_id(key) for key in chunk],
                client=pipe,
            )
            parsers.append(parse_acquire(chunk))
        for asks in _chunks(request.handovers):
            args = [self._handover_ms]
            for ask in asks:
                args += [str(ask.token), ask.target]
            keys = [a.key for a in asks]
            self._request(keys=self._pair_keys(keys), args=args, client=pipe)
            parsers.append(
                parse_each(keys, lambda key, v: reply.handovers.__setitem__(key, _text(v)))
            )
        for items in _chunks(request.connected):
            keys = [key for key, _ in items]
            self._connected(
                keys=[k.handover(key) for key in keys],
                args=[str(token) for _, token in items],
                client=pipe,
            )
            parsers.append(
                parse_each(keys, lambda key, v: reply.connected.__setitem__(key, bool(int(v))))
            )
        for items in _chunks(request.release):
            args = [self._ttl_ms]
            for key, token in items:
                args += [sub_id(key), str(token)]
            keys = [key for key, _ in items]
            self._release(keys=[k.holders, *self._pair_keys(keys)], args=args, client=pipe)
            parsers.append(
                parse_each(
                    keys, lambda key, v: reply.released.__setitem__(key, ReleaseStatus(_text(v)))
                )
            )
        for items in _chunks(request.cancel):
            keys = [key for key, _ in items]
            self._cancel(
                keys=[k.handover(key) for key in keys],
                args=[str(token) for _, token in items],
                client=pipe,
            )
            parsers.append(
                parse_each(keys, lambda key, v: reply.cancelled.__setitem__(key, _text(v)))
            )
        if parsers:
            for parse, result in zip(parsers, pipe.execute(), strict=True):
                parse(result)
        return dataclasses.replace(reply, acquired=tuple(acquired))

    def leave(self, member: MemberRecord) -> None:
        k = self.keys
        self._run(
            "leave",
            lambda: self._leave(
                keys=[k.members, k.member(member.name), k.drain],
                args=[member.name, member.incarnation],
            ),
        )

    # -- for the command line -----------------------------------------------------------------

    def request_drain(self, name: str, cancel: bool = False) -> None:
        """Ask member `name` to hand everything over (or stop asking)."""

        def work() -> None:
            if cancel:
                self._client.hdel(self.keys.drain, name)
            else:
                seconds, micros = self._client.time()
                self._client.hset(self.keys.drain, name, int(seconds) * 1000 + micros // 1000)

        self._run("drain", work)

    def snapshot(self) -> FleetSnapshot:
        """Members, drain requests and every lease of the group (read-only)."""
        return self._run("status", self._snapshot)

    def _snapshot(self) -> FleetSnapshot:
        k = self.keys
        seconds, micros = self._client.time()
        now = int(seconds) * 1000 + micros // 1000
        epoch_raw = self._client.get(k.epoch)
        ranked = cast(
            list[tuple[bytes, float]], self._client.zrange(k.members, 0, -1, withscores=True)
        )
        names = [_text(name) for name, _ in ranked]
        records = self._client.mget([k.member(n) for n in names]) if names else []
        # By name, not by last heartbeat: `fleet status` prints a table that stays put.
        members = tuple(
            sorted(
                (
                    (name, int(score), MemberRecord.from_json(raw))
                    for name, (_, score), raw in zip(names, ranked, records, strict=True)
                ),
                key=lambda member: member[0],
            )
        )
        drain = {_text(n): int(v) for n, v in self._client.hgetall(k.drain).items()}
        lease_keys = sorted(
            _text(key) for key in self._client.scan_iter(match=k.lease_prefix + "*", count=1000)
        )
        pipe = self._client.pipeline(transaction=False)
        subs = [parse_sub_id(key[len(k.lease_prefix) :]) for key in lease_keys]
        for key, sub in zip(lease_keys, subs, strict=True):
            pipe.get(key)
            pipe.pttl(key)
            pipe.get(k.handover(sub))
        values = pipe.execute() if lease_keys else []
        leases = tuple(
            LeaseView(
                sub,
                Token.parse(_text(values[3 * i])) if values[3 * i] else None,
                int(values[3 * i + 1]),
                Handover.from_json(_opt(values[3 * i + 2])),
            )
            for i, sub in enumerate(subs)
        )
        return FleetSnapshot(
            server_ms=now,
            epoch_ms=int(epoch_raw) if epoch_raw else None,
            members=members,
            drain=drain,
            leases=leases,
        )

"""What a fleet member asks of Redis and what it gets back, as plain immutable data.

FleetMember (member.py) produces the requests and consumes the replies without any I/O;
RedisFleetStore (store.py) turns a request into script calls and the script replies into
these objects. Tests drive FleetMember with replies from a model of the store.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from forwarder.fleet.keys import Key, Token


@dataclass(frozen=True)
class MemberRecord:
    """What a member publishes about itself with each heartbeat."""

    name: str
    incarnation: str  # random per process: tells a restarted process from its predecessor
    host: str
    pid: int
    started_at: float  # unix time
    version: str
    draining: bool = False  # takes no subscription; hands its own over
    candidates: int = 0  # subscriptions it was given to share
    digest: str = ""  # of the candidate set: members with different digests disagree
    owned: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> MemberRecord | None:
        """The record, or None for a value that is not one (never raises)."""
        if text is None:
            return None
        try:
            data = json.loads(text)
            return cls(
                name=str(data["name"]),
                incarnation=str(data["incarnation"]),
                host=str(data.get("host", "")),
                pid=int(data.get("pid", 0)),
                started_at=float(data.get("started_at", 0.0)),
                version=str(data.get("version", "")),
                draining=bool(data.get("draining", False)),
                candidates=int(data.get("candidates", 0)),
                digest=str(data.get("digest", "")),
                owned=int(data.get("owned", 0)),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class LiveMember:
    record: MemberRecord
    last_beat_ms: int  # server time of its last heartbeat


class HandoverState(enum.Enum):
    REQUESTED = "requested"  # the holder named a target
    CLAIMED = "claimed"  # the target took a successor token and is connecting
    CONNECTED = "connected"  # the target's connection is up: the holder may close


@dataclass(frozen=True)
class Handover:
    """A planned move of one subscription, as stored in Redis."""

    source: Token  # the holder's token
    target: str  # member name
    state: HandoverState
    successor: Token | None
    at_ms: int

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Handover | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            source = Token.parse(str(data["from"]))
            successor = Token.parse(str(data["successor"])) if data.get("successor") else None
            if source is None:
                return None
            return cls(
                source,
                str(data["to"]),
                HandoverState(data["state"]),
                successor,
                int(data.get("at", 0)),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Previous:
    """Who acquired a subscription before us, from the `holders` hash."""

    token: Token
    released: bool  # True: they let it go (no successor); False: their lease ran out
    at_ms: int  # when they acquired it (held) or released it
    last_beat_ms: int | None  # their last heartbeat (the start of a failover gap)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Previous | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            token = Token.parse(str(data["token"]))
            if token is None:
                return None
            beat = data.get("beat")
            return cls(
                token,
                data.get("state") == "released",
                int(data.get("at", 0)),
                int(beat) if isinstance(beat, int | float) else None,
            )
        except (ValueError, TypeError, KeyError):
            return None


# -- heartbeat round: membership and renewals ---------------------------------------------


@dataclass(frozen=True)
class Renewal:
    key: Key
    token: Token
    successor: bool  # renewing a successor claim (the handover record), not a lease


class RenewStatus(enum.Enum):
    HELD = "held"  # the lease is ours and was extended
    REASSERTED = "reasserted"  # Redis had lost it (fresh epoch): we set it again
    SUCCESSOR = "successor"  # still the successor; the claim was extended
    PROMOTED = "promoted"  # the successor now holds the lease
    LOST = "lost"  # not ours any more


@dataclass(frozen=True)
class RenewReply:
    key: Key
    status: RenewStatus
    handover: Handover | None = None  # HELD: the planned move on this lease, if any
    holder: Token | None = None  # LOST: whose lease it is now (None: nobody's)
    previous: Previous | None = None  # PROMOTED after the holder's lease ran out


@dataclass(frozen=True)
class HeartbeatRequest:
    record: MemberRecord
    renewals: tuple[Renewal, ...] = ()


@dataclass(frozen=True)
class HeartbeatReply:
    server_ms: int
    epoch_ms: int  # when this Redis started keeping the fleet's state
    members: tuple[LiveMember, ...]  # every member whose key exists, us included
    renewals: tuple[RenewReply, ...] = ()
    drain_requested: bool = False  # `forwarder fleet drain` named us
    conflict: MemberRecord | None = None  # another live process uses our name


# -- change round: acquisitions, handovers, releases ----------------------------------------


class AcquireStatus(enum.Enum):
    ACQUIRED = "acquired"  # the lease is ours (new token)
    CLAIMED = "claimed"  # the holder asked us to take over: connect as successor
    HELD = "held"  # someone else holds it
    QUIET = "quiet"  # free, but Redis lost the fleet's state less than a lease_ttl ago


@dataclass(frozen=True)
class AcquireReply:
    key: Key
    status: AcquireStatus
    token: Token | None = None  # ACQUIRED / CLAIMED
    holder: Token | None = None  # HELD
    previous: Previous | None = None  # ACQUIRED: the last holder, if Redis remembers one


@dataclass(frozen=True)
class HandoverAsk:
    key: Key
    token: Token  # ours
    target: str


class ReleaseStatus(enum.Enum):
    HANDED = "handed"  # the lease went to the connected successor
    RELEASED = "released"  # deleted, nobody took it over
    LOST = "lost"  # it was not ours any more


@dataclass(frozen=True)
class ChangeRequest:
    acquire: tuple[Key, ...] = ()
    handovers: tuple[HandoverAsk, ...] = ()
    connected: tuple[tuple[Key, Token], ...] = ()  # successor connections that are up
    release: tuple[tuple[Key, Token], ...] = ()
    cancel: tuple[tuple[Key, Token], ...] = ()  # handovers we call off

    def __bool__(self) -> bool:
        return bool(self.acquire or self.handovers or self.connected or self.release or self.cancel)


@dataclass(frozen=True)
class ChangeReply:
    acquired: tuple[AcquireReply, ...] = ()
    handovers: dict[Key, str] = field(default_factory=dict)  # requested | claimed | ... | lost
    connected: dict[Key, bool] = field(default_factory=dict)
    released: dict[Key, ReleaseStatus] = field(default_factory=dict)
    cancelled: dict[Key, str] = field(default_factory=dict)  # cancelled | connected | gone


class FleetStore(Protocol):
    """Where leases live: RedisFleetStore, or a model of it in tests.

    Every method raises FleetUnavailable when it cannot tell whether it worked."""

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatReply: ...
    def change(self, member: MemberRecord, request: ChangeRequest) -> ChangeReply: ...
    def leave(self, member: MemberRecord) -> None: ...


def digest(keys: Sequence[Key]) -> str:
    """A short fingerprint of a candidate set (order does not matter)."""
    h = hashlib.blake2b(digest_size=8)
    for source, event in sorted(keys):
        h.update(f"{source}\x00{event}\x01".encode())
    return h.hexdigest()

"""The leases one member holds (as owner) or is about to hold (as successor), with the local
deadline rule. Pure, no I/O; not thread-safe (FleetMember guards it).

The deadline rule: a request sent at monotonic time t that acquired, renewed or claimed a
lease makes it ours until t + lease_ttl - margin, by our own clock. Redis set its expiry to
lease_ttl after it *ran* the request, which is after t; so even if this process is paused,
cut off from Redis or slow, it stops using the lease before anyone else can acquire it. A
reply that arrives after that time cannot extend it: the renewal counts from when it was
sent.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from forwarder.fleet.keys import Key, Token
from forwarder.fleet.protocol import HandoverState, Renewal


class Role(enum.Enum):
    OWNER = "owner"  # holds the lease
    SUCCESSOR = "successor"  # holds a claim on a planned move to us; connects first


@dataclass
class Move:
    """A planned move of a lease we own to another member (holder side)."""

    target: str
    reason: str  # "rebalance", "drain" or "shutdown": the label of handovers_total
    asked_at: float  # monotonic; the move is called off handover_timeout later
    requested: bool = False  # Redis has the handover record
    state: HandoverState | None = None  # as last seen in Redis
    successor: Token | None = None  # the target's claim, once it made one
    cancelling: bool = False


@dataclass
class Holding:
    key: Key
    token: Token
    role: Role
    deadline: float  # monotonic: stop by then unless renewed
    move: Move | None = None  # owner: moving out
    connected: bool = False  # successor: our connection is up
    reported: bool = False  # successor: Redis knows it is up
    closing_since: float | None = None  # owner: told to close (handed over), when
    closed: bool = False  # owner: our connection is closed and drained


class LeaseBook:
    def __init__(self, lease_ttl: float, margin: float) -> None:
        self._lease_ttl = lease_ttl
        self._margin = margin
        self._holdings: dict[Key, Holding] = {}

    def __len__(self) -> int:
        return len(self._holdings)

    def __iter__(self) -> Iterator[Holding]:
        return iter(list(self._holdings.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._holdings

    def get(self, key: Key) -> Holding | None:
        return self._holdings.get(key)

    def deadline_after(self, sent_at: float) -> float:
        """The deadline a request sent at `sent_at` earns."""
        return sent_at + self._lease_ttl - self._margin

    def add(self, key: Key, token: Token, role: Role, sent_at: float) -> Holding:
        holding = Holding(key, token, role, self.deadline_after(sent_at))
        self._holdings[key] = holding
        return holding

    def drop(self, key: Key) -> Holding | None:
        return self._holdings.pop(key, None)

    def extend(self, holding: Holding, sent_at: float) -> None:
        # max(): replies of two rounds can arrive out of order only in tests, never shorten.
        holding.deadline = max(holding.deadline, self.deadline_after(sent_at))

    def expired(self, now: float) -> list[Holding]:
        """Remove and return every holding whose deadline has passed."""
        gone = [h for h in self._holdings.values() if now >= h.deadline]
        for holding in gone:
            del self._holdings[holding.key]
        return gone

    def renewals(self) -> tuple[Renewal, ...]:
        return tuple(
            Renewal(h.key, h.token, successor=h.role is Role.SUCCESSOR)
            for h in self._holdings.values()
        )

    def count(self, role: Role) -> int:
        return sum(1 for h in self._holdings.values() if h.role is role)

    def may_connect(self, key: Key, now: float, within: float) -> bool:
        """May a *new* connection for `key` start now and be up within `within` seconds?

        Owners: yes while the lease is valid and no planned move is under way (the
        successor's connection must be the newest one). Successors: yes while the claim is
        valid. A connection started must finish its handshake before the deadline, or it
        could take the feed from the next owner: hence `within`.
        """
        holding = self._holdings.get(key)
        if holding is None or now + within >= holding.deadline:
            return False
        if holding.role is Role.SUCCESSOR:
            return True
        return holding.move is None and holding.closing_since is None

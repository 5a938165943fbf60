"""What a fleet member tells the daemon to do, per subscription (the outputs of FleetMember).

Phase 2 wiring (docs/fleet.md, "What phase 2 wires"): the fleet thread hands each round's
directives to a listener; the daemon applies them to its subscriptions. Besides these, the
member answers `may_connect(key)` before every connection attempt and `deadline(key)` for
the local stop-by time.
"""

from __future__ import annotations

from dataclasses import dataclass

from forwarder.fleet.keys import Key


@dataclass(frozen=True)
class Takeover:
    """Why nobody was receiving before we took a subscription over: the new owner writes a
    gap record from `since` (unix time) to its first connection, cause `cause`."""

    cause: str  # "failover" (holder's lease ran out), "released" (let go with no
    #             successor), "reset" (Redis lost the fleet's state)
    since: float
    previous: str | None  # the member that held it, when Redis remembers
    detail: str


@dataclass(frozen=True)
class Acquired:
    """We own the subscription now: run it (connect)."""

    key: Key
    takeover: Takeover | None  # None: nobody was known to hold it before


@dataclass(frozen=True)
class ConnectAsSuccessor:
    """The holder hands the subscription to us: connect now (the server gives the feed to the
    newest connection) and call `FleetMember.connected(key)` once the handshake succeeded.
    The holder closes only after that."""

    key: Key


@dataclass(frozen=True)
class Promoted:
    """The successor now holds the lease (the holder released it, or its lease ran out).

    Nothing to do when the connection is up. `takeover` is set when the holder's lease ran
    out before our connection was reported up: then a gap is possible, as after a failover."""

    key: Key
    takeover: Takeover | None


@dataclass(frozen=True)
class CloseHandedOver:
    """Our successor is connected: close our connection politely, keep reading until the
    close echo (what is in flight is still spooled), then call `FleetMember.closed(key)`.
    Frames already spooled are written as always."""

    key: Key


@dataclass(frozen=True)
class StopNow:
    """Close this subscription's connection now and do not reconnect: it is not ours.

    reason: "deadline" (our own clock says the lease may have expired: Redis unreachable or
    this process was paused), "lost" (another member holds it, or Redis no longer has our
    lease), "aborted" (a handover to us was called off), "removed" (no longer a candidate).
    """

    key: Key
    reason: str


@dataclass(frozen=True)
class Resubscribe:
    """Re-subscribe make-before-break at monotonic time `not_before`: a handover was called
    off after the successor may have taken the feed, and only a newer connection of ours
    gets it back. Waiting until the successor's claim can no longer be used keeps it from
    stealing the feed again."""

    key: Key
    not_before: float
    reason: str


@dataclass(frozen=True)
class PermissionChanged:
    """`may_connect(key)` may answer differently now (a planned move was called off): if the
    subscription is not connected, try again."""

    key: Key


Directive = (
    Acquired
    | ConnectAsSuccessor
    | Promoted
    | CloseHandedOver
    | StopNow
    | Resubscribe
    | PermissionChanged
)

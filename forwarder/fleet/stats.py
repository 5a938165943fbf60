"""Counters and gauges of one fleet member, written by its fleet thread under the member's
lock and read by the Prometheus collector at scrape time (plain fields; a scrape may see
one round half-applied, never a torn value)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# The label values the collector always exports (so alerts see 0, not absence).
HANDOVER_REASONS = ("rebalance", "drain", "shutdown")
LOSS_REASONS = ("deadline", "lost")
ACQUISITION_KINDS = ("new", "failover", "released", "reset", "handover")


@dataclass
class FleetStats:
    members: int = 0  # live members seen in the last heartbeat
    eligible: int = 0  # of which may take subscriptions
    candidates: int = 0  # subscriptions this member was given to share
    owned: int = 0  # leases held
    successor: int = 0  # planned moves to us under way
    moving: int = 0  # planned moves away from us under way
    draining: bool = False
    disagreeing: int = 0  # live members given a different candidate set
    redis_ok: bool = False  # the last round trip worked
    epoch_changes: int = 0  # times Redis was seen to have lost the fleet's state
    reasserted: int = 0  # leases set again after Redis lost them
    handovers: Counter[str] = field(default_factory=Counter)  # completed, by reason
    handovers_aborted: int = 0
    lease_losses: Counter[str] = field(default_factory=Counter)  # by reason
    acquisitions: Counter[str] = field(default_factory=Counter)  # by kind
    round_failures: Counter[str] = field(default_factory=Counter)  # by Redis error kind

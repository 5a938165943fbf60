"""The `[fleet]` settings, validated once by forwarder.config into a frozen FleetConfig."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_LEASE_TTL = 10.0
DEFAULT_HANDOVER_TIMEOUT = 30.0
DEFAULT_MAX_HANDOVERS = 100


@dataclass(frozen=True)
class FleetConfig:
    """Fleet mode settings. Times in seconds.

    A lease renewed (or acquired) by a request sent at monotonic time t is held until
    t + lease_ttl - margin by this member's own clock, whatever Redis answers later: the
    margin covers the request's trip and the clock rate difference between this host and
    Redis. Renewals run every `renew_interval`, so a lease survives a couple of failed
    rounds before its deadline.
    """

    enabled: bool = False
    name: str | None = None  # None: hostname-pid, fixed when the member starts
    group: str = "default"  # members of one group share subscriptions; part of every key
    lease_ttl: float = DEFAULT_LEASE_TTL
    renew_interval: float = DEFAULT_LEASE_TTL / 3
    margin: float = DEFAULT_LEASE_TTL / 5
    # A planned move whose successor has not connected within this long is called off
    # (the holder keeps the subscription and tries again later).
    handover_timeout: float = DEFAULT_HANDOVER_TIMEOUT
    # Rebalancing moves at most this many subscriptions at a time (each move is a new
    # upstream connection); a drain or a shutdown moves everything at once.
    max_handovers: int = DEFAULT_MAX_HANDOVERS

    def member_name(self) -> str:
        """The configured name, else `hostname-pid` (characters outside [A-Za-z0-9_.-]
        become '-')."""
        return self.name if self.name is not None else default_member_name()

    def check(self) -> str | None:
        """The first inconsistency between the times, as a message; None if they fit."""
        if self.margin <= 0 or self.renew_interval <= 0:
            return "fleet.margin and fleet.renew_interval must be positive"
        if self.renew_interval + self.margin >= self.lease_ttl:
            return (
                f"fleet.renew_interval ({self.renew_interval:g}) + fleet.margin "
                f"({self.margin:g}) must be less than fleet.lease_ttl ({self.lease_ttl:g}): "
                "otherwise a lease can reach its deadline before the next renewal"
            )
        return None


def default_member_name(hostname: str | None = None, pid: int | None = None) -> str:
    """`hostname-pid`, shortened and cleaned so that it is a valid member name."""
    host = hostname if hostname is not None else socket.gethostname()
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", host)[:48].strip("-_.") or "host"
    return f"{host}-{pid if pid is not None else os.getpid()}"

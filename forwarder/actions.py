"""What the sans-I/O rules ask of their I/O loop, and the clock they read.

A subscription's rules (subscription.py) never touch a socket: they append these actions to
their `actions` list and the loop that owns them (loop.py) carries them out, in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a connection (a handshake) for the subscription; answer with handshake_*."""

    link_id: int


@dataclass(frozen=True, slots=True)
class Listen:
    """Start reading the connection's socket."""

    link_id: int


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes (a control frame) to the connection."""

    link_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Release:
    """Close the connection's socket and forget it."""

    link_id: int


Action = Connect | Listen | Send | Release


class Clock(Protocol):
    """Monotonic seconds for deadlines, unix time for what is reported (gaps, stats)."""

    def monotonic(self) -> float: ...
    def wall(self) -> float: ...


class SystemClock:
    """time.monotonic() and time.time(), called directly (no wrapper: they run per read)."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


SYSTEM_CLOCK = SystemClock()

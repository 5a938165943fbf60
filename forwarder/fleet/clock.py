"""The clock a fleet member reads (the same shape as the subscription rules' clock)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for deadlines, unix time for what is reported (gaps, status)."""

    def monotonic(self) -> float: ...
    def wall(self) -> float: ...


class SystemClock:
    """time.monotonic() and time.time()."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

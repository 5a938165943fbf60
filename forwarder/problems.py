"""What is wrong with a subscription right now: the one definition /metrics, /status and
`forwarder watch` share.

A subscription has zero or more *problems*, each a stable name:

    down            configured but not connected (starting, connecting, in backoff, stopped)
    auth            down, and the last handshake was answered 401 or 403
    stalled         connected, but no frame for longer than its event's `stall_after`
    reconnecting    at least STORM_RECONNECTS reconnects within the last STORM_WINDOW seconds
    displaced       another client keeps taking the feed: the watchdog stands down (flapping)
    token_expiring  the token's exp claim is less than TOKEN_EXPIRING_SECONDS away (or past)

At fleet scale the metrics give these their own series (bounded: only unhealthy
subscriptions have one), so alerts can name the source and event without a series per
subscription. The judgement reads the stats' plain fields without locks (see stats.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from forwarder.stats import State, SubscriptionStats

PROBLEMS: tuple[str, ...] = (
    "down",
    "auth",
    "stalled",
    "reconnecting",
    "displaced",
    "token_expiring",
)
# "More than 10 reconnects in 10 minutes" is a storm: each reconnect can lose what was in
# flight, while the normal churn of a healthy feed is a reconnect every few minutes at most.
STORM_RECONNECTS = 10
STORM_WINDOW = 600.0
# How often the reconnect counters are sampled for the window (the window's resolution).
SAMPLE_EVERY = 30.0
TOKEN_EXPIRING_SECONDS = 3 * 86400.0
AUTH_STATUSES = frozenset({"401", "403"})
_NONE: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds of the problems; built once from the configuration."""

    stall_after: Mapping[str, float]  # event (or "default") -> seconds; 0 = never stalled
    started_at: float  # unix time: the silence of a subscription that never received starts here

    def stall_threshold(self, event: str) -> float:
        return self.stall_after.get(event, self.stall_after.get("default", 0.0))


class ProblemFinder:
    """Classifies subscriptions. Thread-safe: any thread may call `find()`.

    The reconnect window needs history: each call may sample every subscription's reconnect
    counter (at most once per SAMPLE_EVERY seconds, under a lock that only guards the
    samples, never the subscriptions). Without a call for a while, the window covers what
    the samples cover, at least the time since the oldest one kept.
    """

    def __init__(self, policy: HealthPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        # (monotonic time, reconnect counters by index at that time), oldest first.
        self._samples: deque[tuple[float, list[int]]] = deque()

    def find(self, subs: Sequence[SubscriptionStats], now: float) -> list[tuple[str, ...]]:
        """Problems of each subscription (by index), `now` in unix time. O(len(subs))."""
        baseline = self._baseline(subs)
        thresholds = {
            event: self.policy.stall_threshold(event) for event in {s.event for s in subs}
        }
        started = self.policy.started_at
        out: list[tuple[str, ...]] = []
        append = out.append
        for index, s in enumerate(subs):
            if not s.configured:
                append(_NONE)
                continue
            found: list[str] | None = None
            state = s.state
            if state is not State.CONNECTED:
                found = ["down"]
                if s.last_handshake_status in AUTH_STATUSES:
                    found.append("auth")
            else:
                limit = thresholds[s.event]
                last = s.last_message_at
                if limit > 0 and now - (last if last is not None else started) > limit:
                    found = ["stalled"]
            before = baseline[index] if index < len(baseline) else 0
            if s.reconnects - before >= STORM_RECONNECTS:
                found = [*(found or ()), "reconnecting"]
            until = s.flapping_until
            if until is not None and until > now:
                found = [*(found or ()), "displaced"]
            exp = s.token_expires_at
            if exp is not None and exp - now < TOKEN_EXPIRING_SECONDS:
                found = [*(found or ()), "token_expiring"]
            append(_NONE if found is None else tuple(found))
        return out

    def _baseline(self, subs: Sequence[SubscriptionStats]) -> list[int]:
        """Reconnect counters about STORM_WINDOW ago (or as long ago as the samples go)."""
        now = self._clock()
        with self._lock:
            samples = self._samples
            if not samples or now - samples[-1][0] >= SAMPLE_EVERY:
                samples.append((now, [s.reconnects for s in subs]))
            # Keep the newest sample at least a window old, drop the ones before it.
            while len(samples) > 1 and now - samples[1][0] >= STORM_WINDOW:
                samples.popleft()
            return samples[0][1]


def unhealthy(problems: Sequence[tuple[str, ...]]) -> list[int]:
    """Indices of the subscriptions with at least one problem, in order."""
    return [i for i, found in enumerate(problems) if found]

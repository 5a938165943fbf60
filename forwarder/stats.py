"""Live counters shared by the threads, read by /metrics and /status.

Each field has exactly one writing thread (named in the comments); other threads only read.
Under the GIL a read of an int or a reference is atomic, so no locks are needed and the hot
path (one subscriber thread per subscription, one writer thread) pays nothing for metrics.
"""

from __future__ import annotations

import bisect
import enum
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class State(enum.Enum):
    """Where a subscription is in its connect/read/backoff cycle."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class LatencyHistogram:
    """Cumulative-bucket histogram written by one thread (no lock, unlike prometheus_client's)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last slot: +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


@dataclass(eq=False)
class SubscriptionStats:
    """Counters of one (source, event) subscription."""

    source: str
    event: str
    stream: str
    # False for frames found in the spool whose subscription is no longer configured: they
    # are still written (and counted) but have no connection to report.
    configured: bool = True
    # Written by the subscriber thread.
    state: State = State.STARTING
    received: int = 0
    received_bytes: int = 0
    reconnects: int = 0
    dropped: int = 0  # frames refused because the buffer was full
    close_codes: dict[str, int] = field(default_factory=lambda: {"1006": 0})
    handshake_failures: dict[str, int] = field(default_factory=lambda: {"401": 0})
    connected_since: float | None = None  # unix time
    last_message_at: float | None = None  # unix time of the last data frame
    last_close_code: str | None = None
    last_handshake_status: str | None = None
    last_error: str | None = None  # redacted, human-readable
    next_attempt_at: float | None = None  # unix time, while in BACKOFF
    # Also written by the subscriber thread only (resilience, see subscriber.py).
    resubscribes: dict[str, int] = field(
        default_factory=lambda: {"silence": 0, "periodic": 0}
    )  # make-before-break re-subscribes completed, by what triggered them
    displacements: int = 0  # re-subscribes that showed another client had taken the feed
    flapping_until: float | None = None  # unix time; the watchdog stands down until then
    # (seconds of blind intervals already closed, unix time the open one began or None),
    # assigned as one tuple so that a reader never sees half an update.
    blind: tuple[float, float | None] = (0.0, None)
    token_expires_at: float | None = None  # the token's `exp` claim (unverified), unix time
    # Written by the writer thread.
    forwarded: int = 0
    lost: int = 0  # refused by Redis, and so was the dead-letter entry
    gaps_recorded: int = 0  # gap records written to the gap stream
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> frames dead-lettered
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    # Written by readers of blind_seconds() (scrapes), under _blind_lock.
    _blind_reported: float = field(default=0.0, repr=False)
    _blind_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def labels(self) -> tuple[str, str]:
        return (self.source, self.event)

    def blind_seconds(self, now: float) -> float:
        """Closed blind time plus the open interval up to `now` (unix time). Any thread.

        Never smaller than a value returned before: the open interval is measured with the
        reader's clock and closed with the subscriber's, and a counter must not go backwards.
        """
        closed, since = self.blind
        value = closed + (max(0.0, now - since) if since is not None else 0.0)
        with self._blind_lock:
            value = max(value, self._blind_reported)
            self._blind_reported = value
        return value


@dataclass(eq=False)
class WriterStats:
    """Counters of the Redis writer; written by the writer thread only."""

    errors: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "connection",
                "timeout",
                "auth",
                "oom",
                "readonly",
                "loading",
                "busy",
                "noperm",
                "wrongtype",
                "cluster",
                "replication",
                "other",
            ),
            0,
        )
    )
    last_ok_at: float | None = None  # monotonic time of the last successful Redis reply
    last_error: str | None = None
    config_error: str | None = None  # NOPERM/WRONGTYPE/auth: writes stopped until fixed
    config_error_kind: str | None = None  # its error kind
    batches: int = 0
    replayed: int = 0  # entries skipped because Redis had them before this process started

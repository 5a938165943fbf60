"""Gap records: the intervals in which a subscription was not receiving (sans-I/O).

Every such interval goes to the spool as a GAP entry (`{"start": ms, "end": ms, "cause": ...,
...}`), ordered with the subscription's frames, and the writer appends it to the gap stream.
Causes:
    close:CODE   the connection ended (`close:1006` for drops and timeouts)
    startup      the first connection of a new subscription needed retries
    restart      forwarder itself was not running: from the moment the previous run stopped
                 receiving (its last frame, or its stop) to the first connection of this one
    watchdog     a silence re-subscribe found the old connection displaced (see
    periodic     displacement.py); likewise for a periodic re-subscribe
Disconnections start when the loss was detected (or at the last byte received, for timeouts)
and end when the next handshake completed. The blind time also feeds
forwarder_disconnected_seconds_total through `SubscriptionStats.blind`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from forwarder.spool import GAP, Entry
from forwarder.stats import SubscriptionStats

log = logging.getLogger(__name__)


class Outbox:
    """Entries for the spool (frames and gap records, in order), gathered by the rules of the
    subscriptions of one I/O loop and appended by the loop in one chunk per turn."""

    __slots__ = ("entries", "nbytes")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.nbytes = 0

    def take(self) -> tuple[list[Entry], int]:
        entries, nbytes = self.entries, self.nbytes
        self.entries = []
        self.nbytes = 0
        return entries, nbytes


@dataclass
class _Open:
    start: float  # unix time
    cause: str
    detail: str
    attempts: int = 0  # failed connection attempts since
    handshake: str | None = None  # the last failed attempt's status ("401", "error", "token")


class GapBook:
    """The open blind interval of one subscription and the records it produces."""

    def __init__(self, index: int, stats: SubscriptionStats, outbox: Outbox) -> None:
        self._index = index
        self._stats = stats
        self._outbox = outbox
        self._open: _Open | None = None

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def open(self, start: float, cause: str, detail: str) -> None:
        """The subscription stopped receiving at `start` (unix time)."""
        self._open = _Open(start, cause, detail)
        closed, _ = self._stats.blind
        self._stats.blind = (closed, start)

    def attempt_failed(self, status: str) -> None:
        """A connection attempt failed while the interval is open."""
        if self._open is not None:
            self._open.attempts += 1
            self._open.handshake = status

    def close(self, end: float, recovered: bool) -> None:
        """Receiving again (or stopping, `recovered` False) at `end`: record the interval."""
        gap = self._open
        if gap is None:
            return
        self._open = None
        closed, _ = self._stats.blind
        self._stats.blind = (closed + max(0.0, end - gap.start), None)
        if gap.cause == "startup" and not gap.attempts:
            return  # a first connection that simply worked is not a gap worth a record
        self.emit(gap.start, end, gap.cause, gap.detail, recovered, gap.attempts, gap.handshake)

    def add_blind(self, seconds: float) -> None:
        """Blind time found after the fact (a displacement)."""
        closed, since = self._stats.blind
        self._stats.blind = (closed + max(0.0, seconds), since)

    def emit(
        self,
        start: float,
        end: float,
        cause: str,
        detail: str,
        recovered: bool,
        attempts: int = 0,
        handshake: str | None = None,
    ) -> None:
        record: dict[str, int | str] = {
            "start": int(start * 1000),
            "end": int(max(start, end) * 1000),
            "cause": cause,
            "recovered": int(recovered),
            "attempts": attempts,
            "detail": detail[:200],
        }
        if handshake is not None:
            record["handshake"] = handshake
        payload = orjson.dumps(record)
        self._outbox.entries.append(Entry(self._index, GAP, payload, end))
        self._outbox.nbytes += len(payload)


def utc(unix: float) -> str:
    """A unix time as an ISO 8601 UTC string, for log lines."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))

"""Make-before-break re-subscribes of one subscription (sans-I/O).

A re-subscribe is due after `silence_timeout` without a data frame (the displacement watchdog)
or every `resubscribe_interval`. It opens a new connection B while the old one A keeps being
read. Once B is up the upstream sends to B, so A gets a close frame and is read until its echo,
EOF or CLOSE_ECHO_TIMEOUT; only then is B read, its frames waiting in the kernel meanwhile. So
the order per stream is kept and nothing in flight is lost. A B that cannot be opened keeps A
(and no re-subscribe is tried again before its back-off delay). Whether the switch showed a
displacement is displacement.py's verdict.
"""

from __future__ import annotations

import math

from forwarder.config import SourceConfig
from forwarder.displacement import DisplacementWatch
from forwarder.link import Link
from forwarder.stats import SubscriptionStats


class MakeBeforeBreak:
    """The re-subscribe state of one subscription. Not thread-safe (its loop's)."""

    def __init__(
        self, source: SourceConfig, stats: SubscriptionStats, watch: DisplacementWatch
    ) -> None:
        self._source = source
        self._stats = stats
        self._watch = watch
        self.reason: str | None = None  # a re-subscribe's handshake is in flight, for this
        self.next: Link | None = None  # the new connection: holds the feed, read after the old
        self._switching = ""  # the reason of the switch under way
        self._silent_for = 0.0  # the old connection's silence when the new one took the feed
        self._frames_before = 0  # the old connection's data frames then

    @property
    def busy(self) -> bool:
        return self.reason is not None or self.next is not None

    def due(self, link: Link) -> tuple[str | None, float]:
        """(what triggers the next re-subscribe of `link`, or None; monotonic time it is due)."""
        # Called after every input of the subscription: plain arithmetic, no allocations.
        source = self._source
        silence = source.silence_timeout
        periodic = source.resubscribe_interval
        reason: str | None = None
        due = math.inf
        if silence > 0:
            due, reason = link.last_data + silence, "silence"
        if periodic > 0 and link.opened + periodic < due:
            due, reason = link.opened + periodic, "periodic"
        if reason is None:
            return None, due
        # Not while standing down after flapping, nor before a failed attempt's back-off.
        return reason, max(due, link.retry_at, self._watch.flap_until)

    def begin(self, reason: str) -> None:
        """The new connection's handshake was asked for."""
        self.reason = reason

    def abandon(self) -> str | None:
        """The handshake under way is no re-subscribe any more (it failed, or the old
        connection ended first and it became the reconnect); returns what it was for."""
        reason, self.reason = self.reason, None
        return reason

    def took_feed(self, new: Link, old: Link, now: float) -> None:
        """The new connection is up: the upstream sends to it now. `old` is drained next."""
        self._switching, self.reason = self.reason or "", None
        self.next = new
        self._silent_for = now - old.last_data
        self._frames_before = old.data_frames

    def switched(self, old: Link, why: str, heard: float, now: float, probe: bool) -> Link:
        """The old connection is drained (`why`: how it ended): return the new one, to read.

        `heard`: unix time of the last data frame; `probe`: watch the new connection for
        displacement evidence (not while stopping)."""
        new = self.next
        assert new is not None
        self.next = None
        reason = self._switching
        stats = self._stats
        stats.resubscribes[reason] = stats.resubscribes.get(reason, 0) + 1
        drained = old.data_frames - self._frames_before
        self._watch.switched(
            reason, new.id, self._silent_for, heard, new.opened_wall, drained, now, probe, why
        )
        return new

"""Displacement evidence and flapping (sans-I/O).

The upstream keeps one connection per (instance, event) and a newer one takes the feed without
telling the older, which stays open and receives nothing (see the README's "Behaviour
towards the upstream"). Pings cannot see that, so a silence watchdog does: no data frame
for `silence_timeout` triggers a make-before-break re-subscribe (resubscribe.py). Whether
that re-subscribe found a *displacement* is decided here.

A quiet event (`call.upsert` can be silent for hours) and a displaced one look the same from
the old connection. What tells them apart is the new one: a re-subscribe counts as a
displacement only when the old connection had been silent for at least
EVIDENCE_SILENCE_FACTOR evidence windows, yielded nothing while being drained (frames in
flight there show it held the feed until the switch), and the new one then receives
EVIDENCE_FRAMES data frames within one window W (silence_timeout / 100, between 0.1 and 30 s;
3 s by default): traffic that resumes at once after a long silence was flowing to someone
else. A quiet event shows nothing on either connection and never counts: a Poisson-quiet
event passes the test with probability below 1e-6 per watchdog firing, and a burst of
activity counts only if it starts within W of a re-subscribe (1% of bursts with the
defaults), so a quiet event reaching the flapping threshold is practically impossible.

A confirmed displacement is recorded as a gap (from the last data frame before the silence to
the moment the new connection took the feed: an upper bound); `flap_threshold` of them within
`flap_window` mean another client keeps taking the feed back, and instead of fighting it the
watchdog stands down for `flap_backoff` (doubling on each repeat, up to 8x) after an ERROR
naming the likely cause.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass

from forwarder.config import SourceConfig
from forwarder.gaps import GapBook, utc
from forwarder.stats import SubscriptionStats

log = logging.getLogger(__name__)

EVIDENCE_FRAMES = 3  # more than the 2 frames one API send can produce on messages.upsert
EVIDENCE_WINDOW_MIN = 0.1
EVIDENCE_WINDOW_MAX = 30.0
EVIDENCE_SILENCE_FACTOR = 4.0
FLAP_BACKOFF_MAX_FACTOR = 8  # the flap back-off doubles on each repeat, up to this factor


def evidence_window(silence_timeout: float) -> float:
    """W: how soon traffic must resume on a new connection to show the old one was displaced."""
    if silence_timeout <= 0:
        return EVIDENCE_WINDOW_MAX
    return min(EVIDENCE_WINDOW_MAX, max(EVIDENCE_WINDOW_MIN, silence_timeout / 100.0))


@dataclass
class _Probe:
    """Watching a new connection for displacement evidence."""

    link_id: int
    cause: str  # "watchdog" or "periodic"
    silent_since: float  # unix time of the last data frame before the re-subscribe
    silent_for: float  # seconds
    took_feed_at: float  # unix time the new connection's handshake completed
    until: float  # monotonic end of the evidence window
    frames: int = 0


class DisplacementWatch:
    """Evidence and flapping state of one subscription. Not thread-safe (its loop's)."""

    def __init__(
        self, name: str, source: SourceConfig, stats: SubscriptionStats, gaps: GapBook
    ) -> None:
        self._name = name
        self._source = source
        self._stats = stats
        self._gaps = gaps
        self._probe: _Probe | None = None
        self._displaced_at: collections.deque[float] = collections.deque()
        self.flap_until = -math.inf  # monotonic; the watchdog stands down until then
        self._flap_level = 0
        self._quiet_resubscribes = 0  # consecutive silence re-subscribes that found nothing

    def forget(self) -> None:
        """The probed connection is gone (stop, drop): no verdict."""
        self._probe = None

    def switched(
        self,
        reason: str,
        link_id: int,
        silent_for: float,
        silent_since: float,
        took_feed_at: float,
        drained: int,
        now: float,
        probe: bool,
        why: str,
    ) -> None:
        """A make-before-break re-subscribe completed: the new connection `link_id` is read
        from now on. `silent_for`: seconds without a data frame on the old one before the new
        one took the feed; `drained`: data frames read from the old one after that."""
        window = evidence_window(self._source.silence_timeout)
        # Frames drained from the old connection show it held the feed until just now: not
        # displaced, whatever the new one receives.
        if probe and silent_for >= EVIDENCE_SILENCE_FACTOR * window and not drained:
            self._probe = _Probe(
                link_id,
                "watchdog" if reason == "silence" else "periodic",
                silent_since,
                silent_for,
                took_feed_at,
                now + window,
            )
        if reason != "silence":
            log.info(
                "%s: periodic re-subscribe (make-before-break, %d frames drained from the old "
                "connection: %s)",
                self._name,
                drained,
                why,
            )
            return
        self._quiet_resubscribes += 1
        level = logging.INFO if self._quiet_resubscribes == 1 else logging.DEBUG
        log.log(
            level,
            "%s: no data frame for %.0fs: re-subscribed (make-before-break, %d frames drained "
            "from the old connection: %s); a quiet event repeats this every %.0fs, logged at "
            "DEBUG until frames arrive",
            self._name,
            silent_for,
            drained,
            why,
            self._source.silence_timeout,
        )

    def frames(self, link_id: int, count: int, received: float, now: float, wall: float) -> None:
        """`count` data frames arrived on `link_id` at `received` (monotonic). Per read."""
        self._quiet_resubscribes = 0  # the next quiet re-subscribe is logged at INFO again
        probe = self._probe
        if probe is None or probe.link_id != link_id:
            return
        probe.frames += count
        if received > probe.until:
            self._probe = None
        elif probe.frames >= EVIDENCE_FRAMES:
            self._probe = None
            self._displaced(probe, now, wall)

    def _displaced(self, probe: _Probe, now: float, wall: float) -> None:
        """The new connection proved the old one had been starved: record it, detect flapping."""
        stats = self._stats
        source = self._source
        stats.displacements += 1
        start, end = probe.silent_since, probe.took_feed_at
        self._gaps.emit(start, end, probe.cause, "displaced by another connection", True)
        self._gaps.add_blind(end - start)
        log.warning(
            "%s: displaced: the old connection received nothing for %.1fs and traffic resumed "
            "at once on the new one, so another client with the same token had taken this "
            "event's feed (blind from %s to %s, recorded in the gap stream)",
            self._name,
            probe.silent_for,
            utc(start),
            utc(end),
        )
        if now - self.flap_until > source.flap_window:
            self._flap_level = 0  # the last flapping episode is long over
        times = self._displaced_at
        times.append(now)
        while times and now - times[0] > source.flap_window:
            times.popleft()
        if len(times) < source.flap_threshold:
            return
        times.clear()
        self._flap_level += 1
        factor = min(2 ** (self._flap_level - 1), FLAP_BACKOFF_MAX_FACTOR)
        pause = source.flap_backoff * factor
        self.flap_until = now + pause
        stats.flapping_until = wall + pause
        log.error(
            "%s: flapping: displaced %d times within %.0fs. The upstream keeps one connection "
            "per instance and event and the newest silently wins, so another client keeps "
            "taking this feed: most likely a second forwarder (or another consumer) using the "
            "same token, or the instance's QR code page (GET /instance/qrcode/{instance}) left "
            "open. Not fighting it: no watchdog re-subscribe for %.0fs (forwarder_flapping); "
            "run exactly one consumer per token",
            self._name,
            source.flap_threshold,
            source.flap_window,
            pause,
        )

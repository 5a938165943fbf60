"""When a subscription tries to connect again, and what a failed attempt means (sans-I/O).

Every failure gets a delay from the subscription's `ReconnectBackoff` by cause: transient ones
(refused, reset, timeouts, HTTP 5xx, a dropped connection) quick and fully jittered, a 401/403
or an unreadable token slow (only a human or a token rotation fixes those). A connection that
stayed up for `stable_after` resets the delays. Each failure is counted by status in the
subscription's stats and logged once, with what to check.
"""

from __future__ import annotations

import logging

from forwarder.actions import Clock
from forwarder.backoff import ReconnectBackoff
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.link import LinkEnd
from forwarder.stats import State, SubscriptionStats

log = logging.getLogger(__name__)

HandshakeError = ConfigError | HandshakeRejected | ConnectFailed


class Reconnects:
    """The attempt schedule of one subscription. Not thread-safe (its loop's)."""

    def __init__(
        self,
        name: str,
        url: str,
        stats: SubscriptionStats,
        backoff: ReconnectBackoff,
        clock: Clock,
    ) -> None:
        """`url`: the redacted subscription URL, for log lines."""
        self._name = name
        self._url = url
        self._stats = stats
        self._backoff = backoff
        self._clock = clock
        self.retry_at: float | None = None  # monotonic time of the next attempt (BACKOFF)
        self._attempts = 0

    def begin(self) -> None:
        """An attempt starts now."""
        stats = self._stats
        stats.next_attempt_at = None
        if self._attempts:
            stats.reconnects += 1
        self._attempts += 1
        stats.state = State.CONNECTING

    def due(self, now: float) -> bool:
        """Whether the next attempt is due (once: the schedule is then cleared)."""
        if self.retry_at is None or now < self.retry_at:
            return False
        self.retry_at = None
        return True

    def cancel(self) -> None:
        self.retry_at = None
        self._stats.next_attempt_at = None

    def retry_in(self, delay: float) -> None:
        self._stats.state = State.BACKOFF
        self._stats.next_attempt_at = self._clock.wall() + delay
        self.retry_at = self._clock.monotonic() + delay

    def connected(self, wall: float) -> None:
        """A (re)connection completed its handshake at `wall`."""
        stats = self._stats
        stats.last_handshake_status = "101"
        stats.connected_since = wall
        stats.state = State.CONNECTED
        log.info("%s: connected to %s", self._name, self._url)

    def lost(self, lasted: float, end: LinkEnd | None, replacement: bool) -> None:
        """The connection (with its make-before-break successors) ended after `lasted` s.

        `end` None: a planned end (stopping). `replacement`: a re-subscribe's handshake is
        under way and becomes the reconnect; otherwise the reconnect is scheduled."""
        stats = self._stats
        self._backoff.connection_lasted(lasted)
        stats.connected_since = None
        if end is None:
            log.info("%s: disconnected (stopping)", self._name)
            return
        stats.close_codes[end.label] = stats.close_codes.get(end.label, 0) + 1
        stats.last_close_code = end.label
        stats.last_error = end.why
        if replacement:
            stats.reconnects += 1
            stats.state = State.CONNECTING
            log.info(
                "%s: connection closed after %.1fs (code %s: %s); the re-subscribe under way "
                "replaces it",
                self._name,
                lasted,
                end.label,
                end.why,
            )
            return
        delay = self._backoff.after_failure()
        log.info(
            "%s: connection closed after %.1fs (code %s: %s); reconnecting in %.2fs",
            self._name,
            lasted,
            end.label,
            end.why,
            delay,
        )
        self.retry_in(delay)

    def accepted(self) -> None:
        """The upstream accepted a re-subscribe: past failures are forgotten."""
        self._backoff.reset()

    def failed(self, exc: HandshakeError, keeping: bool, expired_note: str) -> tuple[str, float]:
        """Count and log a failed attempt; return (status label, delay). `keeping`: a
        re-subscribe failed and the current connection stays; `expired_note`: what the
        token's exp claim says, for a 401."""
        stats = self._stats
        name = self._name
        backoff = self._backoff
        stats.last_error = str(exc)
        note = "; keeping the current connection" if keeping else ""
        if isinstance(exc, ConfigError):
            delay = backoff.after_auth_failure()
            log.error("%s: %s%s; retrying in %.1fs", name, exc, note, delay)
            return "token", delay
        if isinstance(exc, HandshakeRejected):
            status = str(exc.status)
            stats.handshake_failures[status] = stats.handshake_failures.get(status, 0) + 1
            stats.last_handshake_status = status
            if exc.status in (401, 403):
                delay = backoff.after_auth_failure()
                log.error(
                    "%s: %s rejected the subscription with HTTP %d: the token is invalid, "
                    "expired or signed with another secret, or the server does not know the "
                    "event name%s%s; retrying in %.1fs",
                    name,
                    self._url,
                    exc.status,
                    expired_note,
                    note,
                    delay,
                )
            else:
                delay = backoff.after_failure()
                log.warning(
                    "%s: handshake failed with HTTP %d%s; retrying in %.1fs",
                    name,
                    exc.status,
                    note,
                    delay,
                )
            return status, delay
        stats.handshake_failures["error"] = stats.handshake_failures.get("error", 0) + 1
        delay = backoff.after_failure()
        log.warning(
            "%s: cannot connect to %s (%s)%s; retrying in %.1fs",
            name,
            self._url,
            exc,
            note,
            delay,
        )
        return "error", delay

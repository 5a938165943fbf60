"""The rules of one subscription (source, event), without sockets or threads (sans-I/O).

`SubscriptionRules` keeps one subscription connected the way python-websockets separates its
protocol from its I/O: it is fed events and answers with actions, and owns nothing but state.

Inputs (methods), each reading the injected clock:
    start / stop / abort             lifecycle (stop is polite: close frames, then the echo)
    handshake_succeeded / _failed    the outcome of a `Connect` it asked for
    received(link, bytes)            what the I/O loop read from a connection
    transport_lost(link, why)        EOF or a socket error
    tick()                           a deadline passed (see `deadline`)
    permission_changed()             the `may_connect` hook changed its answer (fleet leases)
Outputs: `actions` (actions.py: Connect, Listen, Send, Release; the loop performs and clears
them), the frames and gap records appended to the shared `Outbox` (the loop spools them in one
chunk per turn), and the `SubscriptionStats` fields, which only this object writes.

The rules, each unit-tested with a fake clock in tests/test_subscription.py:
* Reconnect backoff by cause (backoff.py): transient failures quick and fully jittered, 401/403
  and unreadable tokens slow; a connection that lasted `stable_after` resets it.
* Keepalive, read timeout and close echo (link.py); frames before a protocol violation kept.
* Make-before-break re-subscribes (resubscribe.py), displacement evidence and flapping
  (displacement.py), gap records (gaps.py), token expiry warnings (expiry.py).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from urllib.parse import quote

from forwarder.actions import SYSTEM_CLOCK, Action, Clock, Connect, Release
from forwarder.attempts import HandshakeError, Reconnects
from forwarder.backoff import ReconnectBackoff
from forwarder.config import Subscription
from forwarder.displacement import DisplacementWatch
from forwarder.expiry import ExpiryWatch
from forwarder.frames import close_code
from forwarder.gaps import GapBook, Outbox
from forwarder.link import Link, LinkEnd, LinkSet, random_mask
from forwarder.resubscribe import MakeBeforeBreak
from forwarder.stats import State, SubscriptionStats

log = logging.getLogger(__name__)

_ids = itertools.count(1)  # link ids, unique in the process (next() is atomic under the GIL)


def close_code_label(code: int) -> str:
    """Metric label for a close code: numeric for standard codes, 4xxx for application ones."""
    if 4000 <= code <= 4999:
        return "4xxx"
    if 1000 <= code <= 3999:
        return str(code)
    return "invalid"


class SubscriptionRules:
    """One subscription's state machine. Not thread-safe: after `start()` every input comes
    from the one I/O loop thread that owns it; other threads only read `stats`, `finished`
    and `failed` (plain attributes, safe to read under the GIL)."""

    def __init__(
        self,
        index: int,
        subscription: Subscription,
        stats: SubscriptionStats,
        backoff: ReconnectBackoff,
        outbox: Outbox,
        *,
        clock: Clock = SYSTEM_CLOCK,
        token_expiry: Callable[[], float | None] = lambda: None,
        may_connect: Callable[[], bool] = lambda: True,
        resume_from: float | None = None,
        mask: Callable[[], bytes] = random_mask,
        resume_cause: tuple[str, str] = ("restart", "forwarder was not running"),
        lease_deadline: Callable[[], float] = lambda: math.inf,
        on_connected: Callable[[], None] = lambda: None,
    ) -> None:
        """`index`: the subscription's route in the spool. `token_expiry`: the current token's
        exp claim (may raise ConfigError). `may_connect`: asked before every connection
        attempt (fleet mode: does this process own the subscription?). `resume_from`: unix
        time up to which the previous run of forwarder accounted for this subscription; its
        first connection then closes a gap with cause `restart` (fleet mode: `resume_cause`,
        e.g. `failover` from the dead member's last heartbeat). Fleet mode also passes
        `lease_deadline` (monotonic time by which the subscription must stop unless renewed,
        read on this loop's clock, so the stop needs no other thread) and `on_connected`
        (called after every successful handshake)."""
        self.index = index
        self.subscription = subscription
        self.stats = stats
        self.name = f"{subscription.source.name}/{subscription.event}"
        self.actions: list[Action] = []
        self.finished = False  # stopped, with no connection left
        self.failed: BaseException | None = None  # set by the loop if an input raised (a bug)
        # After `received`, whether the loop should ask `deadline()` again: a read started a
        # frame (the read timeout is the one deadline a read can advance) or answered a ping
        # (the next deadline moves from the pong's to the next ping's). Other reads only push
        # deadlines a little later, and a tick that comes early is harmless. Reset by the loop.
        self.retime = False
        self._source = subscription.source
        self._outbox = outbox
        self._clock = clock
        self._may_connect = may_connect
        self._resume_from = resume_from
        self._resume_cause = resume_cause
        self._lease_deadline = lease_deadline
        self._on_connected = on_connected
        self._forced_resubscribe = math.inf  # resubscribe_at(): monotonic time, inf: none
        # Not self.actions.append: the loop replaces the list each time it takes the actions.
        self._links = LinkSet(self._source, lambda a: self.actions.append(a), mask)  # noqa: PLW0108
        self._current: Link | None = None  # the connection being read (drained at a switch)
        self._pending: int | None = None  # link id of the handshake in flight
        self._stopping = False
        self._session_started = 0.0
        self._heard_wall = 0.0  # unix time of the last data frame, or of the last (re)connect
        self._gaps = GapBook(index, stats, outbox)
        self._watch = DisplacementWatch(self.name, self._source, stats, self._gaps)
        self._mbb = MakeBeforeBreak(self._source, stats, self._watch)
        self._expiry = ExpiryWatch(self._source, stats, token_expiry)
        url = f"{self._source.url}?event={quote(subscription.event, safe='')}&token=***"
        self._reconnects = Reconnects(self.name, url, stats, backoff, clock)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin: blind until the first connection (a gap if it needs retries, or after a
        restart of forwarder)."""
        wall = self._clock.wall()
        if self._resume_from is not None:
            self._gaps.open(min(self._resume_from, wall), *self._resume_cause)
        else:
            self._gaps.open(wall, "startup", "not connected yet")
        self._attempt()

    def stop(self) -> None:
        """Polite end: no new attempt; open connections get a close frame (1001) and are read
        until the echo, so frames in flight are still spooled. `finished` once all are gone."""
        if self._stopping or self.finished:
            return
        self._stopping = True
        self._reconnects.cancel()
        self._watch.forget()
        now = self._clock.monotonic()
        for link in list(self._links.links.values()):
            if link.listening:  # a parked replacement is closed once it is read (_ended)
                self._links.close(link, 1001, now)
        self._maybe_finish()

    def abort(self) -> None:
        """Immediate end: every socket is released, nothing more is read."""
        self._stopping = True
        self._reconnects.cancel()
        self._current = self._mbb.next = None
        for link in list(self._links.links.values()):
            self._links.release(link)
        self._maybe_finish()

    def permission_changed(self) -> None:
        """`may_connect` may answer differently now: connect if allowed and not connected.

        A refusal never closes the current connection: in fleet mode `may_connect` is also
        false while a planned move is pending, and the holder keeps reading until its
        successor is up ("no new attempt"). Leaving the feed is `stop()` ("close now")."""
        if self._stopping or self.finished:
            return
        if self._may_connect():
            idle = self._current is None and self._pending is None
            if idle and self._reconnects.retry_at is None:
                self._attempt()

    def resubscribe_at(self, when: float) -> None:
        """A make-before-break re-subscribe at monotonic time `when` (fleet mode: a called-off
        handover whose successor may have taken the feed); a plain attempt if not connected."""
        if self._stopping or self.finished:
            return
        if self._current is None:
            self.permission_changed()
            return
        self._forced_resubscribe = min(self._forced_resubscribe, when)

    # -- connecting -----------------------------------------------------------------------------

    def _attempt(self) -> None:
        if self._stopping:
            return
        if not self._may_connect():
            self.stats.state = State.BACKOFF  # until permission_changed()
            self.stats.next_attempt_at = None
            return
        self._reconnects.begin()
        self._connect()

    def _connect(self) -> None:
        self._pending = next(_ids)
        self.actions.append(Connect(self._pending))

    def handshake_succeeded(self, link_id: int, token_expires_at: float | None = None) -> None:
        """The connection asked for is up; its socket is ready but not yet read."""
        if self.finished or link_id != self._pending:
            self.actions.append(Release(link_id))  # a late answer nobody waits for
            return
        self._pending = None
        now = self._clock.monotonic()
        wall = self._clock.wall()
        self._expiry.token_used(token_expires_at, now, wall)
        self._on_connected()
        link = self._links.open(link_id, now, wall)
        old = self._current
        if self._mbb.reason is not None and old is not None:
            # Make-before-break: the upstream sends to the new connection now. Drain the old
            # one (close frame, read until the echo) before reading the new one.
            self._mbb.took_feed(link, old, now)
            self._links.close(old, 1000, now)
            self._reconnects.accepted()
            return
        self._gaps.close(wall, recovered=True)
        self._heard_wall = wall
        self._reconnects.connected(wall)
        self._session_started = now
        self._current = link
        self._links.listen(link)
        if self._stopping:  # stopped meanwhile: read what is in flight, leave
            self._links.close(link, 1001, now)

    def handshake_failed(
        self, link_id: int, error: HandshakeError, token_expires_at: float | None = None
    ) -> None:
        if self.finished or link_id != self._pending:
            return
        self._pending = None
        resubscribing = self._mbb.abandon() is not None and self._current is not None
        if self._stopping:
            self._maybe_finish()
            return
        now = self._clock.monotonic()
        wall = self._clock.wall()
        if token_expires_at is not None:
            self._expiry.token_used(token_expires_at, now, wall)
        note = self._expiry.expired_note(wall)
        label, delay = self._reconnects.failed(error, resubscribing, note)
        if resubscribing:
            assert self._current is not None
            self._current.retry_at = now + delay  # no re-subscribe before; keep reading
            return
        self._gaps.attempt_failed(label)
        self._reconnects.retry_in(delay)

    # -- reading --------------------------------------------------------------------------------

    def received(self, link_id: int, data: bytes) -> None:
        """Bytes read from a connection. The hot path: one call per read, not per frame."""
        link = self._links.links.get(link_id)
        if link is None:
            return
        now = self._clock.monotonic()
        wall = self._clock.wall()
        started = link.frame_started
        pinged = link.ping_sent is not None
        count, nbytes, close = link.receive(
            data, now, wall, self.index, self._outbox.entries, self.actions
        )
        if pinged or (started is None and link.frame_started is not None):
            self.retime = True
        if count:
            self._stored(link, count, nbytes, now, wall)
        if close is not None:
            self._close_received(link, close, wall)
        elif link.parser.error is not None:  # after storing what came before it (issue 9)
            self._links.close(link, 1002, now)
            self._ended(link, LinkEnd("1002", f"protocol error: {link.parser.error}", wall))

    def _stored(self, link: Link, count: int, nbytes: int, now: float, wall: float) -> None:
        stats = self.stats
        link.last_data = now
        link.data_frames += count
        self._heard_wall = wall
        self._outbox.nbytes += nbytes
        stats.received += count
        stats.received_bytes += nbytes
        stats.last_message_at = wall
        self._watch.frames(link.id, count, now, now, wall)

    def _close_received(self, link: Link, payload: bytes, wall: float) -> None:
        if link.closing:  # the echo of ours: a polite end
            self._ended(link, LinkEnd("1000", "closed (close frame echoed)", wall))
            return
        code = close_code(payload)
        self._links.close(link, code, self._clock.monotonic())  # echo it (RFC 6455 5.5.1)
        reason = payload[2:125].decode("utf-8", "replace")
        why = f"closed by the server: {code} {reason}".rstrip()
        self._ended(link, LinkEnd(close_code_label(code), why, wall))

    def transport_lost(self, link_id: int, why: str) -> None:
        """EOF or an error on the socket (the loop has stopped reading it)."""
        link = self._links.links.get(link_id)
        if link is not None:
            self._ended(link, LinkEnd("1006", why, self._clock.wall()))

    # -- timers ---------------------------------------------------------------------------------

    def deadline(self) -> float:
        """The monotonic time at which `tick` has something to do (inf: nothing planned).

        Ticking earlier is harmless: every timer is checked against the clock."""
        if self.finished:
            return math.inf
        retry_at = self._reconnects.retry_at
        due = self._links.deadline()
        if retry_at is not None and retry_at < due:
            due = retry_at
        current = self._current
        if current is not None and self._idle(current):
            due = min(
                due, self._mbb.due(current)[1], self._expiry.next_check, self._forced_resubscribe
            )
        lease = self._lease_deadline()
        return lease if lease < due and not self._stopping else due

    def tick(self) -> None:
        if self.finished:
            return
        now = self._clock.monotonic()
        wall = self._clock.wall()
        if not self._stopping and now >= self._lease_deadline():
            # Fleet mode: our lease may expire in Redis from here on and another member may
            # take the feed; stop by our own clock, whatever the fleet thread is doing.
            log.warning("%s: the fleet lease reached its deadline: stopping", self.name)
            self.stop()
            return
        if self._reconnects.due(now):
            self._attempt()
        for link, end in self._links.due(now, wall):
            self._ended(link, end)
        current = self._current
        if current is None or not self._idle(current):
            return
        reason, due = self._mbb.due(current)
        if self._forced_resubscribe <= due:
            reason, due = "fleet", self._forced_resubscribe
        if reason is not None and now >= due and self._may_connect():
            if reason == "fleet":
                self._forced_resubscribe = math.inf
            self._mbb.begin(reason)
            self._connect()
        elif now >= self._expiry.next_check:
            self._expiry.check(now, wall)

    def _idle(self, link: Link) -> bool:
        """Read and open, with no close, switch or handshake under way."""
        mbb = self._mbb
        return (
            link.listening
            and link.closing_since is None
            and self._pending is None
            and mbb.reason is None
            and mbb.next is None
            and not self._stopping
        )

    # -- ending connections ---------------------------------------------------------------------

    def _ended(self, link: Link, end: LinkEnd) -> None:
        self._links.release(link)
        self._maybe_finish()
        if link is not self._current:
            return  # a replacement parked for a switch is not read, so it never ends first
        if self._mbb.next is not None:
            # The old connection of a make-before-break is drained: read the new one.
            now = self._clock.monotonic()
            new = self._mbb.switched(link, end.why, self._heard_wall, now, not self._stopping)
            self._current = new
            self._links.listen(new)
            if self._stopping:
                self._links.close(new, 1001, now)
            return
        self._current = None
        self._watch.forget()
        self._session_lost(end)

    def _session_lost(self, end: LinkEnd) -> None:
        """The connection (and its make-before-break successors) ended."""
        lasted = self._clock.monotonic() - self._session_started
        if self._stopping:
            self._reconnects.lost(lasted, None, replacement=False)
            self._maybe_finish()
            return
        self._gaps.open(end.lost_at, f"close:{end.label}", end.why)
        replacement = self._pending is not None  # a re-subscribe's handshake under way
        if replacement:
            self._mbb.abandon()
        self._reconnects.lost(lasted, end, replacement)

    def _maybe_finish(self) -> None:
        if not self._stopping or self._links.links or self.finished:
            return
        self.finished = True
        self._gaps.close(self._clock.wall(), recovered=False)
        stats = self.stats
        stats.state = State.STOPPED
        stats.next_attempt_at = None
        stats.connected_since = None

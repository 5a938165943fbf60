"""FleetMember: one forwarder process's part in a fleet, as a sans-I/O object.

Inputs: clock readings (`tick`), Redis replies (`heartbeat_done`, `change_done`, or the
`*_failed` variants), the candidate subscriptions (`set_candidates`: the desired set before
fleet mode filters it), and the subscriber's reports (`connected`, `closed`).
Outputs: the set this member may run now (`runnable`, `may_connect`, `deadline`) and the
directives of directives.py (`take_directives`).

A round, driven by the fleet thread (runner.py) every renew_interval:
    1. tick: leases past their local deadline are given up (StopNow "deadline") before
       anything else, so a process resumed after a pause never uses a stale lease.
    2. heartbeat_request -> store.heartbeat -> heartbeat_done: our record, every renewal,
       the live members, drain requests, the epoch.
    3. change_request -> store.change -> change_done: acquisitions of the subscriptions
       the assignment gives us, claims of moves to us, moves away, "connected" reports,
       releases, called-off moves.

Thread-safety: every public method takes the member's lock; the fleet thread runs the
rounds, I/O loop threads call may_connect/connected/closed, HTTP threads status().
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from forwarder import __version__
from forwarder.errors import FleetError
from forwarder.fleet.clock import Clock, SystemClock
from forwarder.fleet.config import FleetConfig
from forwarder.fleet.directives import (
    Acquired,
    ConnectAsSuccessor,
    Directive,
    Promoted,
    StopNow,
    Takeover,
)
from forwarder.fleet.handover import Mover
from forwarder.fleet.keys import Key, sub_id
from forwarder.fleet.leases import Holding, LeaseBook, Role
from forwarder.fleet.membership import AssignmentCache, MembershipView
from forwarder.fleet.protocol import (
    AcquireStatus,
    ChangeReply,
    ChangeRequest,
    HeartbeatReply,
    HeartbeatRequest,
    MemberRecord,
    Previous,
    ReleaseStatus,
    RenewReply,
    RenewStatus,
    digest,
)
from forwarder.fleet.stats import FleetStats

log = logging.getLogger(__name__)

FAST_ROUND = 0.25  # seconds between rounds while a move or a report is under way
WARN_INTERVAL = 30.0  # seconds between two WARNING lines about failing round trips


class FleetMember:
    def __init__(
        self,
        config: FleetConfig,
        clock: Clock | None = None,
        *,
        name: str | None = None,
        incarnation: str | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.name = name or config.member_name()
        self.incarnation = incarnation or secrets.token_hex(6)
        self.stats = FleetStats()
        self._lock = threading.Lock()
        self._book = LeaseBook(config.lease_ttl, config.margin)
        self._view = MembershipView(self.name, self.incarnation)
        self._assignment = AssignmentCache()
        self._mover = Mover(config, self.stats, self.clock)
        self._candidates: tuple[Key, ...] = ()
        self._candidate_set: frozenset[Key] = frozenset()
        self._version = 0
        self._digest = digest(())
        self._draining: str | None = None  # None, "drain" or "shutdown"
        self._directives: list[Directive] = []
        self._heartbeat_sent = 0.0
        self._change_sent = 0.0
        self._unwanted: set[Key] = set()  # acquired but not (or no longer) ours to run
        self._joined = False  # a heartbeat reply arrived
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._warned_at = -WARN_INTERVAL
        self._started_at = self.clock.wall()
        self._host = socket.gethostname()
        self.wake: Callable[[], None] = lambda: None  # set by the runner

    # -- inputs from the daemon (any thread) --------------------------------------------------

    def set_candidates(self, keys: Iterable[Key]) -> None:
        """The subscriptions to share (the desired set before fleet mode). Every member of
        the group should be given the same set: `disagreeing` members show otherwise."""
        ordered = tuple(sorted(set(keys)))
        with self._lock:
            if ordered == self._candidates:
                return
            self._candidates = ordered
            self._candidate_set = frozenset(ordered)
            self._digest = digest(ordered)
            self._version += 1
            self.stats.candidates = len(ordered)
        self.wake()

    def connected(self, key: Key) -> None:
        """Our successor connection for `key` is up (after ConnectAsSuccessor)."""
        with self._lock:
            holding = self._book.get(key)
            if holding is not None and holding.role is Role.SUCCESSOR:
                holding.connected = True
        self.wake()

    def closed(self, key: Key) -> None:
        """Our handed-over connection for `key` is closed and drained (after
        CloseHandedOver): the lease can go to the successor."""
        with self._lock:
            holding = self._book.get(key)
            if holding is not None and holding.closing_since is not None:
                holding.closed = True
        self.wake()

    def drain(self, reason: str = "drain") -> None:
        """Hand everything over and take nothing new ("drain": `forwarder fleet drain`;
        "shutdown": SIGTERM). Returns at once; `drained()` tells when it is done."""
        with self._lock:
            self._start_drain(reason)
        self.wake()

    # -- queries (any thread) -----------------------------------------------------------------

    def may_connect(self, key: Key, within: float = 0.0) -> bool:
        """May a new connection for `key` start now? `within`: the longest the handshake may
        take (it must finish before the lease's deadline). Checks our clock, not the fleet
        thread, so it is right even just after this process was paused."""
        with self._lock:
            return self._book.may_connect(key, self.clock.monotonic(), within)

    def deadline(self, key: Key) -> float | None:
        """Monotonic time by which `key` must be stopped unless renewed; None: not ours."""
        with self._lock:
            holding = self._book.get(key)
            return None if holding is None else holding.deadline

    def runnable(self) -> frozenset[Key]:
        """Subscriptions this member may run now: owned (and not handed over) or claimed as
        successor, with a deadline still ahead."""
        with self._lock:
            now = self.clock.monotonic()
            return frozenset(
                h.key
                for h in self._book
                if now < h.deadline and h.closing_since is None and h.key not in self._unwanted
            )

    def owned(self) -> frozenset[Key]:
        """Subscriptions whose lease we hold (handed-over ones until they are released),
        deadline still ahead."""
        with self._lock:
            now = self.clock.monotonic()
            return frozenset(h.key for h in self._book if h.role is Role.OWNER and now < h.deadline)

    def leases(self) -> dict[Key, int]:
        """{subscription: fencing number} of the leases we run as owner right now."""
        with self._lock:
            now = self.clock.monotonic()
            return {
                h.key: h.token.fence
                for h in self._book
                if h.role is Role.OWNER
                and now < h.deadline
                and h.closing_since is None
                and h.key not in self._unwanted
            }

    def role(self, key: Key) -> str | None:
        with self._lock:
            holding = self._book.get(key)
            return None if holding is None else holding.role.value

    def drained(self) -> bool:
        """Draining, and nothing left to hand over."""
        with self._lock:
            return self._draining is not None and not any(
                h.role is Role.OWNER or h.connected for h in self._book
            )

    def health(self) -> tuple[bool, str | None]:
        """(ok, reason) for /readyz: the member is joined and its round trips work."""
        with self._lock:
            conflict = self._view.conflict
            if conflict is not None:
                return False, (
                    f"fleet: the member name {self.name!r} is in use by another live process "
                    f"(host {conflict.host}, pid {conflict.pid}): give each process its own "
                    "[fleet] name"
                )
            if self._failing_since is not None:
                age = self.clock.monotonic() - self._failing_since
                return False, (
                    f"fleet: no Redis round trip for {age:.0f}s ({self._last_error}); "
                    "subscriptions stop as their leases' deadlines pass"
                )
            if not self._joined:
                return False, "fleet: not joined yet"
            return True, None

    # -- a round (fleet thread) ----------------------------------------------------------------

    def tick(self) -> None:
        with self._lock:
            self._tick(self.clock.monotonic())

    def heartbeat_request(self) -> HeartbeatRequest:
        with self._lock:
            now = self.clock.monotonic()
            self._tick(now)
            self._heartbeat_sent = now
            return HeartbeatRequest(self._record(), self._book.renewals())

    def heartbeat_done(self, reply: HeartbeatReply) -> None:
        with self._lock:
            sent = self._heartbeat_sent
            now = self.clock.monotonic()
            self._succeeded()
            if self._view.apply(reply):
                self.stats.epoch_changes += 1
                log.warning(
                    "fleet: Redis lost the fleet's state (a restart without persistence or a "
                    "flush): leases are re-asserted by their holders; free subscriptions are "
                    "not acquired for %.0fs",
                    self.config.lease_ttl,
                )
            self._joined = self._joined or self._view.registered
            if self._view.drain_requested and self._draining is None:
                log.info("fleet: a drain of %s was requested: handing everything over", self.name)
                self._start_drain("drain")
            elif not self._view.drain_requested and self._draining == "drain":
                log.info("fleet: the drain of %s was cancelled", self.name)
                self._draining = None
            lost: Counter[str] = Counter()
            for renewal in reply.renewals:
                self._renewed(renewal, sent, now, lost)
            if lost:
                log.warning("fleet: %s", ", ".join(f"{n} {r}" for r, n in sorted(lost.items())))
            self._refresh_stats()

    def heartbeat_failed(self, error: FleetError) -> None:
        with self._lock:
            self._failed(error)

    def change_request(self) -> ChangeRequest:
        with self._lock:
            now = self.clock.monotonic()
            self._tick(now)
            self._change_sent = now
            return self._plan(now)

    def change_done(self, reply: ChangeReply) -> None:
        with self._lock:
            self._changed(reply, self._change_sent, self.clock.monotonic())
            self._refresh_stats()

    def change_failed(self, error: FleetError) -> None:
        with self._lock:
            self._failed(error)

    def leave_request(self) -> ChangeRequest:
        """The last round: release whatever is still ours (nobody takes it over gracefully)."""
        with self._lock:
            self._start_drain("shutdown")
            return ChangeRequest(
                release=tuple((h.key, h.token) for h in self._book if h.role is Role.OWNER)
            )

    def left(self) -> None:
        """After the leave round (whether or not Redis answered): we hold nothing."""
        with self._lock:
            for holding in self._book:
                self._book.drop(holding.key)
            self._refresh_stats()

    def record(self) -> MemberRecord:
        with self._lock:
            return self._record()

    def take_directives(self) -> list[Directive]:
        with self._lock:
            out, self._directives = self._directives, []
            return out

    def next_round_in(self) -> float:
        """Seconds until the next round: sooner while something is under way, and never
        later than the next deadline."""
        with self._lock:
            now = self.clock.monotonic()
            wait = self.config.renew_interval
            busy = self._draining is not None or any(
                h.move is not None
                or h.closing_since is not None
                or (h.connected and not h.reported)
                for h in self._book
            )
            if busy and len(self._book):
                wait = min(wait, FAST_ROUND)
            for holding in self._book:
                wait = min(wait, max(0.0, holding.deadline - now))
            return wait

    # -- rules (lock held) ----------------------------------------------------------------------

    def _emit(self, directive: Directive) -> None:
        self._directives.append(directive)

    def _start_drain(self, reason: str) -> None:
        if self._draining != "shutdown":
            self._draining = reason

    def _tick(self, now: float) -> None:
        expired = self._book.expired(now)
        for holding in expired:
            self._emit(StopNow(holding.key, "deadline"))
            self._unwanted.discard(holding.key)
            if holding.role is Role.OWNER and holding.closing_since is None:
                self.stats.lease_losses["deadline"] += 1
        if expired:
            log.warning(
                "fleet: %d leases reached their local deadline without a renewal (Redis "
                "unreachable, or this process was paused): their subscriptions stop now",
                len(expired),
            )
            self._refresh_stats()

    def _renewed(self, r: RenewReply, sent: float, now: float, lost: Counter[str]) -> None:
        holding = self._book.get(r.key)
        if holding is None:
            return  # given up meanwhile (deadline)
        if r.status in (RenewStatus.HELD, RenewStatus.REASSERTED, RenewStatus.SUCCESSOR):
            self._book.extend(holding, sent)
            if r.status is RenewStatus.REASSERTED:
                self.stats.reasserted += 1
            if r.status is not RenewStatus.SUCCESSOR:
                for directive in self._mover.on_marker(holding, r.handover, now):
                    self._emit(directive)
        elif r.status is RenewStatus.PROMOTED:
            self._book.extend(holding, sent)
            if holding.role is Role.SUCCESSOR:
                takeover = None if holding.reported else self._takeover(r.previous)
                holding.role = Role.OWNER
                holding.connected = holding.reported = False
                self.stats.acquisitions["handover"] += 1
                self._emit(Promoted(holding.key, takeover))
        else:
            self._book.drop(r.key)
            self._unwanted.discard(r.key)
            move = holding.move
            if move is not None and move.successor is not None and r.holder == move.successor:
                # Our release handed it over; only its reply was lost.
                self.stats.handovers[move.reason] += 1
                return
            if holding.closing_since is not None:
                return  # we were closing it anyway
            if holding.role is Role.SUCCESSOR:
                self._emit(StopNow(r.key, "aborted"))
                return
            self._emit(StopNow(r.key, "lost"))
            self.stats.lease_losses["lost"] += 1
            lost["leases lost (held by another member or gone from Redis)"] += 1

    def _plan(self, now: float) -> ChangeRequest:
        me = self.name
        eligible = self._view.eligible(self._draining is not None)
        assigned = self._assignment.get(self._version, self._candidates, eligible)
        acquire: tuple[Key, ...] = ()
        if self._draining is None and self._view.registered and me in eligible:
            acquire = tuple(
                k for k in self._candidates if assigned.get(k) == me and k not in self._book
            )
        release: list[tuple[Key, Holding]] = []
        for holding in self._book:
            if holding.role is not Role.OWNER:
                continue
            if holding.key not in self._candidate_set and holding.key not in self._unwanted:
                self._unwanted.add(holding.key)
                self._emit(StopNow(holding.key, "removed"))
            if holding.key in self._unwanted or self._mover.ready_to_release(holding, now):
                release.append((holding.key, holding))
        asks = self._mover.plan(self._book, assigned, me, self._draining, now)
        return ChangeRequest(
            acquire=acquire,
            handovers=tuple(a for a in asks if a.key not in self._unwanted),
            connected=tuple(
                (h.key, h.token)
                for h in self._book
                if h.role is Role.SUCCESSOR and h.connected and not h.reported
            ),
            release=tuple((key, h.token) for key, h in release),
            cancel=tuple(self._mover.cancels(self._book, now)),
        )

    def _changed(self, reply: ChangeReply, sent: float, now: float) -> None:
        for a in reply.acquired:
            if a.token is None or a.key in self._book:
                continue
            if a.status is AcquireStatus.ACQUIRED:
                self._book.add(a.key, a.token, Role.OWNER, sent)
                takeover = self._takeover(a.previous)
                self.stats.acquisitions[takeover.cause if takeover else "new"] += 1
                if a.key in self._candidate_set and self._draining is None:
                    self._emit(Acquired(a.key, takeover))
                else:
                    self._unwanted.add(a.key)  # released next round
            elif a.status is AcquireStatus.CLAIMED:
                self._book.add(a.key, a.token, Role.SUCCESSOR, sent)
                self._emit(ConnectAsSuccessor(a.key))
        for key, status in reply.handovers.items():
            holding = self._book.get(key)
            if holding is not None:
                self._mover.on_requested(holding, status)
        for key, ok in reply.connected.items():
            holding = self._book.get(key)
            if holding is not None and ok:
                holding.reported = True
        for key, outcome in reply.released.items():
            holding = self._book.drop(key)
            self._unwanted.discard(key)
            if holding is None:
                continue
            move = holding.move
            if outcome is ReleaseStatus.HANDED:
                self.stats.handovers[move.reason if move else "rebalance"] += 1
            elif outcome is ReleaseStatus.RELEASED and holding.closing_since is not None:
                self.stats.handovers_aborted += 1  # the successor vanished while we closed
        for key, status in reply.cancelled.items():
            holding = self._book.get(key)
            if holding is not None:
                for directive in self._mover.on_cancelled(holding, status, now):
                    self._emit(directive)

    def _takeover(self, previous: Previous | None) -> Takeover | None:
        """Why the subscription was unattended before we got it (for the gap record)."""
        wall = self.clock.wall()
        if previous is None:
            epoch = self._view.epoch_ms
            if epoch is not None and self._view.epoch_is_young(
                int(3 * self.config.lease_ttl * 1000)
            ):
                return Takeover("reset", epoch / 1000.0, None, "Redis lost the fleet's state")
            return None
        member = previous.token.member
        if previous.released:
            return Takeover(
                "released", previous.at_ms / 1000.0, member, f"{member} let it go, no successor"
            )
        beat = previous.last_beat_ms
        since = beat / 1000.0 if beat is not None else wall - self.config.lease_ttl
        # The heartbeats are kept by name: once a new process took the name (a restart after
        # kill -9), the last beat is that process's, later than the death. The dead one
        # beat last at most renew_interval before the new one started.
        if previous.token.incarnation == self.incarnation:
            started: float | None = None
        elif member == self.name:
            started = self._started_at
        else:
            live = self._view.live.get(member)
            renamed = live is not None and live.record.incarnation != previous.token.incarnation
            started = live.record.started_at if live is not None and renamed else None
        if started is not None:
            since = min(since, started - self.config.renew_interval)
        return Takeover("failover", min(since, wall), member, f"the lease of {member} ran out")

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.info("fleet: Redis round trips work again")
        self._failing_since = None
        self._last_error = None
        self.stats.redis_ok = True

    def _failed(self, error: FleetError) -> None:
        now = self.clock.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        self._last_error = str(error)
        self.stats.redis_ok = False
        self.stats.round_failures[error.kind] += 1
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning(
                "%s; %d leases are kept until their local deadlines",
                error,
                len(self._book),
            )

    def _record(self) -> MemberRecord:
        return MemberRecord(
            name=self.name,
            incarnation=self.incarnation,
            host=self._host,
            pid=os.getpid(),
            started_at=self._started_at,
            version=__version__,
            draining=self._draining is not None,
            candidates=len(self._candidates),
            digest=self._digest,
            owned=self._book.count(Role.OWNER),
        )

    def _refresh_stats(self) -> None:
        s = self.stats
        s.members = len(self._view.live)
        s.eligible = len(self._view.eligible(self._draining is not None))
        s.owned = self._book.count(Role.OWNER)
        s.successor = self._book.count(Role.SUCCESSOR)
        s.moving = sum(1 for h in self._book if h.move is not None)
        s.draining = self._draining is not None
        s.disagreeing = len(self._view.disagreeing(self._digest))

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The member's view for /status: members, what we hold, moves under way."""
        with self._lock:
            now = self.clock.monotonic()
            server = self._view.server_ms
            members = []
            for name, live in sorted(self._view.live.items()):
                rec = live.record
                members.append(
                    {
                        "name": name,
                        "host": rec.host,
                        "pid": rec.pid,
                        "draining": rec.draining,
                        "owned": rec.owned,
                        "candidates": rec.candidates,
                        "same_candidates": rec.digest == self._digest,
                        "last_heartbeat_age_seconds": (
                            None
                            if server is None
                            else round((server - live.last_beat_ms) / 1000, 3)
                        ),
                    }
                )
            leases = []
            for h in sorted(self._book, key=lambda h: h.key):
                leases.append(
                    {
                        "subscription": sub_id(h.key),
                        "role": h.role.value,
                        "fence": h.token.fence,
                        "deadline_in_seconds": round(h.deadline - now, 3),
                        "moving_to": None if h.move is None else h.move.target,
                        "move_state": (
                            None if h.move is None or h.move.state is None else h.move.state.value
                        ),
                        "closing": h.closing_since is not None,
                    }
                )
            return {
                "name": self.name,
                "group": self.config.group,
                "incarnation": self.incarnation,
                "joined": self._joined,
                "draining": self._draining,
                "redis_ok": self._failing_since is None and self._joined,
                "last_error": self._last_error,
                "conflict": self._view.conflict is not None,
                "epoch_ms": self._view.epoch_ms,
                "members": members,
                "candidates": len(self._candidates),
                "owned": self._book.count(Role.OWNER),
                "successor": self._book.count(Role.SUCCESSOR),
                "leases": leases,
            }

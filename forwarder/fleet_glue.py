"""Fleet mode in the daemon: the glue between FleetMember (forwarder/fleet/) and the running
subscriptions (daemon._apply, engine.Engine, subscription.SubscriptionRules).

Owner: the daemon, which builds a `FleetGlue` when `[fleet] enabled = true`. Threads:
    fleet   FleetThread: the Redis round trips; hands each round's directives to `_queued`
            (never blocks), which wakes the daemon's main loop
    main    `turn()`: applies the directives (docs/fleet.md, "How it is wired"), reconciles
            through the daemon's `_apply`, pokes subscriptions whose permission came back;
            `drain()` at shutdown
    io-N    the hooks given to each subscription's rules: `may_connect`, `lease_deadline`
            (the stop-by time on the loop's own monotonic clock, so a subscription stops
            before its lease can expire even when the fleet thread is stuck or the process
            was paused), `on_connected` (a successor's handshake is done)

Which subscriptions run: the desired set (static + discovered) is the member's candidate
list; only `desired ∩ member.runnable()` runs. Directives change `runnable()`, so most of
them end in one reconciliation; the rest go to the subscription's loop as an input.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client.registry import CollectorRegistry

from forwarder.config import Config, SourceConfig, Subscription
from forwarder.engine import Engine
from forwarder.fleet.directives import (
    Acquired,
    CloseHandedOver,
    ConnectAsSuccessor,
    Directive,
    PermissionChanged,
    Promoted,
    Resubscribe,
    StopNow,
    Takeover,
)
from forwarder.fleet.keys import Key
from forwarder.fleet.member import FleetMember
from forwarder.fleet.metrics import FleetCollector
from forwarder.fleet.runner import FleetThread
from forwarder.fleet.store import RedisFleetStore, fleet_client
from forwarder.gaps import GapBook, Outbox
from forwarder.spool import DiskSpool, entry_size
from forwarder.stats import State
from forwarder.subscription import SubscriptionRules

log = logging.getLogger(__name__)

DRAIN_SHARE = 0.5  # of shutdown_timeout: the longest a shutdown waits for the successors
NOBODY_GRACE = 1.0  # seconds of draining after which "no other eligible member" ends it


class FleetGlue:
    """Fleet mode for one daemon. `turn()` and `drain()` on the main thread only; the hooks
    from `hooks()` on the subscriptions' loops; `wake()` from anywhere (signal handlers)."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry,
        spool: DiskSpool,
        engine: Engine,
        running: Callable[[], Mapping[Key, SubscriptionRules]],
        reconcile: Callable[[], None],
        member: FleetMember | None = None,
        thread: FleetThread | None = None,
    ) -> None:
        fleet = config.fleet
        self.member = member or FleetMember(fleet)
        store = (
            None
            if thread is not None
            else RedisFleetStore(fleet_client(config.redis, fleet), fleet)
        )
        self._spool = spool
        self._engine = engine
        self._running = running
        self._reconcile = reconcile
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._queue: deque[Directive] = deque()  # guarded by _lock
        # Main thread only:
        self._takeovers: dict[Key, Takeover] = {}  # the gap each acquired key opens with
        self._closing: set[Key] = set()  # handed over: report `closed` once stopped
        # Stopped without a handover (lease deadline, lost): (unix time, reason). If we get
        # it back with no takeover (our own lease, still in Redis), the gap starts there.
        self._stopped: dict[Key, tuple[float, str]] = {}
        self._capped: dict[int, SourceConfig] = {}  # id(source) -> source with capped timeout
        self._sources: list[SourceConfig] = []  # keeps the ids above alive
        # A handshake must end before the lease's deadline (may_connect(within=...)); the
        # deadline is at least lease_ttl - margin - renew_interval ahead after each renewal,
        # so a handshake gets at most 90% of that, or no connection could ever start.
        self._within = 0.9 * max(0.5, fleet.lease_ttl - fleet.margin - fleet.renew_interval)
        self._shutdown_timeout = config.shutdown_timeout
        if thread is None:
            assert store is not None
            thread = FleetThread(self.member, store, listener=self._queued)
        self.thread = thread
        registry.register(FleetCollector(self.member))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """After the spool and the writer, before the first reconciliation."""
        self.thread.start()

    def wake(self) -> None:
        """Let `wait` return early (directives arrived, or a stop signal). Any thread."""
        self._event.set()

    def wait(self, timeout: float) -> None:
        """The main loop's pause: until directives arrive or `timeout` passed."""
        self._event.wait(timeout)
        self._event.clear()

    def failed(self) -> bool:
        return self.thread.failed is not None

    def alive(self) -> bool:
        return self.thread.is_alive()

    def drain(self) -> bool:
        """Shutdown's first step (main thread): hand every subscription to its next member,
        the successors connecting before we close (docs/fleet.md), for at most DRAIN_SHARE of
        shutdown_timeout; then leave the group (what is left is released: the next owner
        records a gap, cause `released`). Returns True when everything was handed over."""
        member = self.member
        started = time.monotonic()
        deadline = started + DRAIN_SHARE * self._shutdown_timeout
        member.drain("shutdown")
        log.info("fleet: handing %d subscriptions over before stopping", len(member.owned()))
        while time.monotonic() < deadline and not member.drained():
            nobody = member.stats.eligible == 0 and member.stats.moving == 0
            if nobody and time.monotonic() - started >= NOBODY_GRACE:
                break  # no other member to hand to: release below
            self.wait(0.05)
            self.turn()
        handed = member.drained()
        self.thread.stop()
        self.thread.join(max(0.1, deadline - time.monotonic()))
        self.thread.leave()
        self.turn()
        log.info(
            "fleet: %s the group (%s)",
            member.name,
            "every subscription handed over" if handed else "the rest released",
        )
        return handed

    # -- the desired set --------------------------------------------------------------------------

    def runnable(self, wanted: Mapping[Key, Subscription]) -> dict[Key, Subscription]:
        """`wanted` (the desired set) is the candidate list; returns the part we run now.
        Each subscription's handshake limit is capped so it fits in a lease (see _within)."""
        self.member.set_candidates(wanted)
        mine = self.member.runnable()
        return {k: self._capped_sub(s) for k, s in wanted.items() if k in mine}

    def split_finished(
        self, running: Mapping[Key, SubscriptionRules]
    ) -> tuple[dict[Key, SubscriptionRules], list[SubscriptionRules]]:
        """(running minus those that stopped themselves at their lease deadline, those)."""
        ended = [r for r in running.values() if r.finished and r.failed is None]
        if not ended:
            return dict(running), []
        now = time.time()
        for rules in ended:
            key = rules.subscription.key
            self._stopped.setdefault(key, (now, "deadline"))
        return {k: r for k, r in running.items() if not r.finished or r.failed}, ended

    def hooks(self, key: Key, resume_from: float | None) -> tuple[float | None, dict[str, Any]]:
        """(resume_from, the rules' fleet hooks) for a subscription we start now. A restart
        gap of the previous run does not apply (another member had the feed meanwhile); a
        takeover's gap does."""
        member = self.member
        within = self._within
        hooks: dict[str, Any] = {
            "may_connect": lambda: member.may_connect(key, within),
            "lease_deadline": lambda: _deadline(member, key),
            "on_connected": lambda: _connected(member, key),
        }
        takeover = self._takeovers.pop(key, None)
        stopped = self._stopped.pop(key, None)
        # Our own lease, still in Redis, taken again after we stopped: no takeover, or a
        # `reset` guessed from a young epoch (the member cannot tell an adopted lease from a
        # fresh one); the blind interval is ours, from the stop.
        if stopped is not None and (takeover is None or takeover.cause == "reset"):
            at, reason = stopped
            hooks["resume_cause"] = (reason, f"stopped ({reason}) and acquired again")
            return at, hooks
        if takeover is not None:
            hooks["resume_cause"] = (takeover.cause, takeover.detail)
            return takeover.since, hooks
        return None, hooks

    # -- directives (main thread) -----------------------------------------------------------------

    def _queued(self, directives: Sequence[Directive]) -> None:
        """The fleet thread's listener: queue and wake the main loop; never blocks."""
        with self._lock:
            self._queue.extend(directives)
        self._event.set()

    def turn(self) -> None:
        """Apply what the fleet thread asked for; reconcile when `runnable()` changed."""
        with self._lock:
            directives = list(self._queue)
            self._queue.clear()
        running = self._running()
        reconcile = any(r.finished and r.failed is None for r in running.values())
        for d in directives:
            if isinstance(d, Acquired):
                if d.takeover is not None:
                    self._takeovers[d.key] = d.takeover
                reconcile = True
            elif isinstance(d, CloseHandedOver):
                self._closing.add(d.key)
                reconcile = True
            elif isinstance(d, ConnectAsSuccessor):
                self._stopped.pop(d.key, None)  # the holder had the feed
                reconcile = True
            elif isinstance(d, StopNow):
                log.info("fleet: %s/%s stops (%s)", *d.key, d.reason)
                if d.reason in ("deadline", "lost") and d.key in running:
                    self._stopped.setdefault(d.key, (time.time(), d.reason))
                reconcile = True
            elif isinstance(d, Promoted):
                if d.takeover is not None and d.key in running:
                    self._gap(running[d.key], d.takeover)
            elif isinstance(d, Resubscribe):
                rules = running.get(d.key)
                if rules is not None:
                    self._engine.call(rules, functools.partial(rules.resubscribe_at, d.not_before))
            elif isinstance(d, PermissionChanged):
                rules = running.get(d.key)
                if rules is not None:
                    self._engine.call(rules, rules.permission_changed)
        if reconcile:
            self._reconcile()
            running = self._running()
        if self._closing:
            for key in [k for k in self._closing if k not in running]:
                self._closing.discard(key)
                self.member.closed(key)
        self._poke(running)

    def _poke(self, running: Mapping[Key, SubscriptionRules]) -> None:
        """Subscriptions held back by `may_connect` (a lease deadline too close for a
        handshake, a move that was pending) wait for `permission_changed`: give it to those
        that may connect now."""
        member = self.member
        for key, rules in running.items():
            stats = rules.stats
            held = stats.state is State.BACKOFF and stats.next_attempt_at is None
            if held and member.may_connect(key, self._within):
                self._engine.call(rules, rules.permission_changed)

    def _gap(self, rules: SubscriptionRules, takeover: Takeover) -> None:
        """A promotion after the holder's lease ran out: nobody may have held the feed from
        `takeover.since` until our connection came up."""
        outbox = Outbox()
        end = rules.stats.connected_since or time.time()
        book = GapBook(rules.index, rules.stats, outbox)  # emit() leaves the stats alone
        book.emit(takeover.since, end, takeover.cause, takeover.detail, recovered=True)
        for entry in outbox.entries:
            if not self._spool.append([entry], entry_size(entry)):
                log.warning("%s: the spool refused a %s gap record", rules.name, takeover.cause)

    def _capped_sub(self, sub: Subscription) -> Subscription:
        source = sub.source
        if source.connect_timeout <= self._within:
            return sub
        capped = self._capped.get(id(source))
        if capped is None:
            capped = dataclasses.replace(source, connect_timeout=self._within)
            self._capped[id(source)] = capped
            self._sources.append(source)
        return dataclasses.replace(sub, source=capped)

    # -- readiness and status (any thread) ------------------------------------------------------

    def health(self) -> tuple[bool, str | None]:
        return self.member.health()

    def role_of(self, source: str, event: str) -> dict[str, Any]:
        """The per-subscription part of /status."""
        return {"fleet_role": self.member.role((source, event))}


def _deadline(member: FleetMember, key: Key) -> float:
    deadline = member.deadline(key)
    return 0.0 if deadline is None else deadline  # not ours (any more): stop at once


def _connected(member: FleetMember, key: Key) -> None:
    if member.role(key) == "successor":  # owners' connections need no report
        member.connected(key)

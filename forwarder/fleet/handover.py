"""The holder's side of a planned move (rebalance, drain, shutdown): make-before-break across
processes.

    holder A                          Redis handover record           target B
    ---------------------------------------------------------------------------------------
    assignment says B; stop starting  requested (from A, to B)
    new connections
                                      claimed (successor token of B)  sees it at its next
                                                                      round; connects
                                      connected                       handshake done:
                                                                      reports it
    sees "connected": closes politely,
    reads until the close echo,
    then releases                     -> the lease now holds B's      renews it: promoted
                                         token (one atomic step)

The upstream gives the feed to the newest connection, so from B's connect on, A's socket only
carries frames already in flight, and A drains those before it closes: nothing is lost and
nothing is read twice. If B does not get connected within handover_timeout the move is
called off (unless B already reported "connected": then it goes on); if B vanishes after
claiming, A re-subscribes once B's claim can no longer be used, to take the feed back.

Pure, no I/O; FleetMember calls these methods under its lock.
"""

from __future__ import annotations

from collections.abc import Mapping

from forwarder.fleet.clock import Clock
from forwarder.fleet.config import FleetConfig
from forwarder.fleet.directives import (
    Acquired,
    CloseHandedOver,
    Directive,
    PermissionChanged,
    Resubscribe,
    Takeover,
)
from forwarder.fleet.keys import Key, Token
from forwarder.fleet.leases import Holding, LeaseBook, Move, Role
from forwarder.fleet.protocol import Handover, HandoverAsk, HandoverState
from forwarder.fleet.stats import FleetStats

# A handed-over connection that has not reported "closed" by then is released anyway: its
# frames are spooled whatever happens, and the successor has the feed.
CLOSE_GRACE = 5.0


class Mover:
    def __init__(self, config: FleetConfig, stats: FleetStats, clock: Clock) -> None:
        self._config = config
        self._stats = stats
        self._clock = clock

    def plan(
        self,
        book: LeaseBook,
        assigned: Mapping[Key, str],
        me: str,
        draining: str | None,
        now: float,
    ) -> list[HandoverAsk]:
        """New moves for the leases the assignment gives to someone else, plus moves whose
        request must be sent again (its reply was lost) or re-targeted (the target left)."""
        asks: list[HandoverAsk] = []
        in_flight = sum(1 for h in book if h.move is not None)
        for h in book:
            if h.role is not Role.OWNER or h.closing_since is not None:
                continue
            target = assigned.get(h.key)
            move = h.move
            if move is not None:
                unclaimed = move.state in (None, HandoverState.REQUESTED)
                retarget = unclaimed and target is not None and target not in (me, move.target)
                if retarget and target is not None:
                    move.target = target
                if (not move.requested or retarget) and not move.cancelling:
                    asks.append(HandoverAsk(h.key, h.token, move.target))
                continue
            if target is None or target == me:
                continue
            if draining is None and in_flight >= self._config.max_handovers:
                continue
            h.move = Move(target, draining or "rebalance", now)
            in_flight += 1
            asks.append(HandoverAsk(h.key, h.token, target))
        return asks

    def cancels(self, book: LeaseBook, now: float) -> list[tuple[Key, Token]]:
        """Moves not connected within handover_timeout: call them off."""
        out: list[tuple[Key, Token]] = []
        for h in book:
            move = h.move
            if move is None or move.state is HandoverState.CONNECTED:
                continue
            if move.cancelling or now - move.asked_at >= self._config.handover_timeout:
                move.cancelling = True
                out.append((h.key, h.token))
        return out

    @staticmethod
    def ready_to_release(h: Holding, now: float) -> bool:
        return h.closing_since is not None and (h.closed or now - h.closing_since >= CLOSE_GRACE)

    def on_marker(self, h: Holding, marker: Handover | None, now: float) -> list[Directive]:
        """Apply the handover record a renewal returned for a lease we own."""
        mine = marker if marker is not None and marker.source == h.token else None
        move = h.move
        if move is None:
            if mine is None:
                return []
            # Redis has a move of ours we lost track of (the request's reply was lost).
            move = h.move = Move(mine.target, "rebalance", now, requested=True)
        if mine is None:
            if not move.requested:
                return []  # the request is still on its way
            return self._aborted(h, now)  # expired, or Redis lost it
        move.requested = True
        move.target = mine.target
        move.state = mine.state
        move.successor = mine.successor
        if mine.state is HandoverState.CONNECTED and h.closing_since is None:
            h.closing_since = now
            return [CloseHandedOver(h.key)]
        return []

    def on_requested(self, h: Holding, status: str) -> None:
        move = h.move
        if move is None:
            return
        if status == "lost":
            h.move = None  # the lease is not ours: the next renewal tells
            return
        move.requested = True
        try:
            move.state = HandoverState(status)
        except ValueError:
            move.state = None

    def on_cancelled(self, h: Holding, status: str, now: float) -> list[Directive]:
        move = h.move
        if move is None:
            return []
        if status == "connected":  # too late to call off: the successor is up
            move.cancelling = False
            move.state = HandoverState.CONNECTED
            return []
        return self._aborted(h, now)

    def _aborted(self, h: Holding, now: float) -> list[Directive]:
        """The move ended without a handover. The target may have connected (and so taken
        the feed) before it gave up: re-subscribe once its claim is surely unusable."""
        h.move = None
        self._stats.handovers_aborted += 1
        out: list[Directive] = [
            Resubscribe(h.key, now + self._config.lease_ttl, "handover_aborted"),
            PermissionChanged(h.key),
        ]
        if h.closing_since is not None:
            # We were already closing: run it again, at once.
            h.closing_since = None
            h.closed = False
            out.append(
                Acquired(
                    h.key,
                    Takeover(
                        "aborted",
                        self._clock.wall(),
                        None,
                        "the successor vanished after it had connected",
                    ),
                )
            )
        return out

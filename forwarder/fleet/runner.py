"""FleetThread: the one thread that does a member's Redis round trips.

Owner: the daemon (phase 2). Lifecycle: `start()`; at shutdown `shutdown(deadline)` (hand
everything over, then leave the group) or `stop()` + `join()`. Between rounds it waits on an
Event that `FleetMember.connected/closed/drain/set_candidates` set, so reports go out at
once rather than a renew_interval later.

Each round's directives go to `listener`, called on this thread: it must only hand them
over (e.g. queue them for the daemon's main loop), never block.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from forwarder.errors import FleetError
from forwarder.fleet.directives import Directive
from forwarder.fleet.member import FleetMember
from forwarder.fleet.protocol import FleetStore

log = logging.getLogger(__name__)

Listener = Callable[[Sequence[Directive]], None]


class FleetThread:
    def __init__(
        self,
        member: FleetMember,
        store: FleetStore,
        listener: Listener = lambda directives: None,
    ) -> None:
        self.member = member
        self._store = store
        self._listener = listener
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drained = threading.Event()
        self.failed: BaseException | None = None  # set if a round raised (a bug)
        member.wake = self._wake.set
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after its current round (no handover: see shutdown)."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def run_round(self) -> list[Directive]:
        """One round, on the calling thread: heartbeat and renewals, then changes. Returns
        (and hands to the listener) the directives it produced."""
        member = self.member
        request = member.heartbeat_request()
        try:
            reply = self._store.heartbeat(request)
        except FleetError as exc:
            member.heartbeat_failed(exc)
        else:
            member.heartbeat_done(reply)
            change = member.change_request()
            if change:
                try:
                    member.change_done(self._store.change(member.record(), change))
                except FleetError as exc:
                    member.change_failed(exc)
        return self._deliver()

    def _deliver(self) -> list[Directive]:
        directives = self.member.take_directives()
        if directives:
            self._listener(directives)
        return directives

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_round()
                if self.member.drained():
                    self._drained.set()
                self._wake.wait(self.member.next_round_in())
                self._wake.clear()
        except Exception as exc:  # a bug: the owner sees `failed` and stops the daemon
            self.failed = exc
            log.exception("fleet thread failed")

    def shutdown(self, deadline: float, clock: Callable[[], float]) -> bool:
        """Hand every subscription over (the successors connect first), then leave.

        Steps: 1. drain: the member takes nothing new and asks the assignment's next
        members to take over; 2. wait until everything is handed over or `deadline`
        (monotonic, read with `clock`); 3. stop the thread; 4. release what is left (the
        next owner records a gap, cause `released`) and remove our member record.
        Returns True when everything was handed over."""
        self.member.drain("shutdown")
        self._drained.wait(max(0.0, deadline - clock()))
        handed = self.member.drained()
        self.stop()
        self.join(max(0.1, deadline - clock()))
        self.leave()
        return handed

    def leave(self) -> None:
        """The last round, on the calling thread: release whatever is still ours and
        remove our member record. Redis errors are logged: the leases then simply run out."""
        member = self.member
        request = member.leave_request()
        try:
            if request:
                self._store.change(member.record(), request)
            self._store.leave(member.record())
        except FleetError as exc:
            log.warning("fleet: could not leave the group cleanly (%s): leases run out", exc)
        member.left()
        self._deliver()

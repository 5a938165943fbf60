"""Two batches in flight: Redis runs one script call while the writer prepares the next.

One call at a time leaves Redis idle while the writer reads a reply, counts, commits, peeks
and packs, and leaves the writer idle while Redis runs the script: with frames spread over
thousands of streams the two halves cost about the same, so Redis and the writer each sat
idle half the time. Here the writer sends the next call on the same connection before it
reads the reply of the one in flight; Redis runs them in order.

Safe because of what the second call may contain. It is only ever the run of entries right
after the first (offsets stay consecutive, the spool commits a prefix), and only plain text
frames of streams the first call does not touch (`disjoint_run`). If the first call does not
come back clean (an error, a refusal, a stop at NOPERM/WRONGTYPE, an entry already applied),
the second one may have been applied all the same: that can only have written streams the
first one does not hold, so no stream's order changes and no entry jumps a refused or
unwritten one of its stream. The writer then reads what is still in flight, and writes from
the first entry again one call at a time (sink.py): the high-water mark skips whatever was
applied, and the offsets sent are remembered so that what was applied counts as forwarded,
not as a replay.

Used only where this holds trivially: one Redis (or a Sentinel's master; a cluster's calls
are per hash slot), no WAIT after each call, and Redis answering quickly (the pacer at its
normal batch size). Writer thread only.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence

import hiredis
import redis.exceptions as rex
from redis.connection import Connection, ConnectionPool

from forwarder.frames import Opcode
from forwarder.script import WRITTEN, Call, Packer, parse_reply
from forwarder.spool import Batch, DiskSpool, Route

TEXT = int(Opcode.TEXT)


def disjoint_run(routes: Sequence[Route], inflight: Batch, rest: Batch, limit: int) -> Batch:
    """The longest prefix of `rest` (at most `limit` entries) that may be sent while
    `inflight` has not answered: text frames of streams `inflight` does not write."""
    touched = {routes[entry.subscription].stream for _, entry in inflight}
    run: Batch = []
    for item in rest[:limit]:
        entry = item[1]
        if entry.opcode != TEXT or type(entry.payload) is not bytes:
            break  # gap records and anything the dead-letter stream takes: one at a time
        if routes[entry.subscription].stream in touched:
            break
        run.append(item)
    return run


class Flight:
    """One call sent on the window's connection, its reply not read yet."""

    __slots__ = ("call", "part", "sent_at")

    def __init__(self, part: Batch, call: Call) -> None:
        self.part = part
        self.call = call
        self.sent_at = time.monotonic()


class Window:
    """Keeps up to two script calls in flight on one connection (see the module doc).

    `run` writes and commits clean calls for as long as disjoint runs keep coming (at most
    `max_calls`), telling `written` about each, and returns False when a call did not come
    back clean or Redis failed: the caller then writes from the commit point one call at a
    time. `sent` collects the offsets of calls that were not settled cleanly: Redis may have
    applied them. `error`: the connection error or timeout that ended it, if any.
    """

    def __init__(
        self,
        spool: DiskSpool,
        packer: Packer,
        sha: str,
        connection: tuple[ConnectionPool, Connection],
        written: Callable[[Batch, dict[int, str]], None],
    ) -> None:
        self._spool = spool
        self._packer = packer
        self._sha = sha
        self._pool, self._conn = connection
        self._written = written
        self.sent: set[int] = set()
        self.error: BaseException | None = None
        self._sending: Batch = []

    def _send(self, part: Batch, floor: int) -> Flight:
        self._sending = part  # if sending fails half-way, Redis may still run it
        call = self._packer.pack(part, {}, floor)
        command = hiredis.pack_command(
            ("EVALSHA", self._sha, len(call.keys), *call.keys, *call.args)  # type: ignore[arg-type]
        )
        self._conn.send_packed_command([command])  # type: ignore[no-untyped-call]
        return Flight(part, call)

    def run(
        self, first: Batch, rest: Batch, limit: int, max_calls: int, keep_going: Callable[[], bool]
    ) -> bool:
        """Write `first` (the head of the last peek, `rest` the remainder of it) and the
        disjoint runs after it. True: everything sent was committed."""
        flights: deque[Flight] = deque()
        routes = self._spool.routes
        calls = 1
        try:
            flights.append(self._send(first, first[0][0]))
            following = disjoint_run(routes, first, rest, limit)
            while flights:
                if following and len(flights) == 1 and calls < max_calls:
                    flights.append(self._send(following, flights[0].part[0][0]))
                    calls += 1
                following = []
                flight = flights.popleft()
                try:
                    reply = parse_reply(self._conn.read_response())
                    n = len(flight.part)
                    clean = reply.stopped is None and reply.statuses.count(WRITTEN) == n
                except (rex.ResponseError, ValueError):
                    clean = False  # e.g. NOSCRIPT, OOM, BUSY: the one-at-a-time path handles it
                if not clean:
                    self._drain(flights)
                    flights.appendleft(flight)
                    self._unsettled(flights)
                    return False
                self._spool.commit(flight.part)  # the head of the last peek
                self._written(flight.part, flight.call.invalid)
                if not flights:
                    break
                # Peek again from the commit point, which is now the call in flight: commit
                # takes a prefix of the last peek.
                inflight = flights[0].part
                more = self._spool.peek(len(inflight) + (limit if keep_going() else 0), 0)
                if len(more) < len(inflight) or more[len(inflight) - 1][0] != inflight[-1][0]:
                    self._drain(flights)  # not what was sent (a recovery moved entries)
                    self._unsettled(flights)
                    return False
                following = disjoint_run(routes, inflight, more[len(inflight) :], limit)
            return True
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            self.error = exc
            self._conn.disconnect()  # type: ignore[no-untyped-call]
            self._unsettled(flights)
            self.sent.update(offset for offset, _ in self._sending)
            return False
        finally:
            self._pool.release(self._conn)

    def _drain(self, flights: deque[Flight]) -> None:
        """Read the replies still in flight, so the connection stays in step."""
        for _ in flights:
            with contextlib.suppress(rex.ResponseError):
                self._conn.read_response()

    def _unsettled(self, flights: deque[Flight]) -> None:
        for flight in flights:
            self.sent.update(offset for offset, _ in flight.part)

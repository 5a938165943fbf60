"""An I/O loop: one thread multiplexing the sockets of many subscriptions with `selectors`.

The loop is thin on purpose: it reads what is ready into one shared buffer, feeds the bytes to
the subscription's rules (subscription.py, sans-I/O), performs the actions they answer with
(connect through the handshake pool, listen, write a control frame, release), keeps their
deadlines in one heap, and hands everything they produced in a turn to the spool as one chunk.
No thread and no read buffer per subscription: a daemon with 10,000 subscriptions runs a few
of these loops (one by default: they share the interpreter lock) and one handshake pool.

TLS (wss://) goes through the same path: websocket-client's SSLSocket is switched to
non-blocking mode; a read that needs more bytes raises SSLWantReadError (wait for readable),
one that needs to write first raises SSLWantWriteError (wait for writable), and decrypted bytes
already inside OpenSSL (`pending()`) are read without waiting for the selector. The polite
close is the same for both: our close frame, then reading until the server's echo.

Threads: everything here runs on the loop's thread, except the methods documented as
thread-safe (`call`, `add`, `stop_subscriptions`, `abort_subscriptions`, `shutdown`, `force`),
which only queue a function for the loop and wake it through a socket pair.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import math
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterable

from forwarder.actions import Connect, Listen, Release, Send
from forwarder.gaps import Outbox
from forwarder.handshake import Handshake, HandshakeJob, HandshakePool, describe
from forwarder.spool import GAP, DiskSpool, Entry
from forwarder.stats import State
from forwarder.subscription import SubscriptionRules

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024  # the loop's one read buffer: at most this much per socket and turn
COALESCE_BELOW = 64 * 1024  # a smaller chunk spooled is followed by COALESCE_PAUSE
COALESCE_PAUSE = 0.001  # seconds
BACKLOG_WAIT = 0.05  # at most this long a loop waits for a lagging (healthy) writer
DROP_LOG_INTERVAL = 10.0  # seconds between two ERROR lines about refused frames
MAX_SELECT = 1.0  # the loop wakes at least this often (a safety net, not a timer)
MIN_TICK = 0.01  # a deadline that is already past is retried no sooner than this
RESCHEDULE_SLACK = 1.0  # seconds a deadline may move later before its heap entry is replaced
TIMER_SLACK = 0.02  # seconds a timer may fire late, so that timers due together share a turn
EOF = "the server closed the TCP connection without a close frame"


class Countdown:
    """Counts finished subscriptions down to zero; `wait` blocks until then. Thread-safe."""

    def __init__(self, count: int) -> None:
        self._left = count
        self._cond = threading.Condition()

    def done(self) -> None:
        with self._cond:
            self._left -= 1
            if self._left <= 0:
                self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._left <= 0, max(0.0, timeout))


class _Sub:
    __slots__ = ("done", "jobs", "links", "rules", "scheduled")

    def __init__(self, rules: SubscriptionRules) -> None:
        self.rules = rules
        self.scheduled = math.inf  # the earliest deadline in the heap for it
        self.done: Countdown | None = None  # told when the subscription has finished
        self.links: set[int] = set()  # its sockets in _socks (one, two during a switch)
        self.jobs: dict[int, HandshakeJob] = {}  # its handshakes in flight, by link id


class _Sock:
    __slots__ = ("events", "link_id", "out", "sock", "sub", "tls")

    def __init__(self, sock: socket.socket, sub: _Sub, link_id: int) -> None:
        self.sock = sock
        self.sub = sub
        self.link_id = link_id
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.out = b""  # control frames the kernel did not take yet
        self.events = 0  # what the selector watches (0: not registered)


class IOLoop:
    """One selector thread. `start()`, then `shutdown()` (polite) or `force()`, then `join()`."""

    def __init__(
        self,
        name: str,
        spool: DiskSpool,
        handshakes: HandshakePool,
        clock: Callable[[], float],
        read_bytes: int = RECV_BYTES,
    ) -> None:
        self.name = name
        self.outbox = Outbox()  # shared by the rules of this loop's subscriptions
        self._spool = spool
        self._handshakes = handshakes
        self._clock = clock  # monotonic
        self._selector = selectors.DefaultSelector()
        self._buf = bytearray(read_bytes)
        self._view = memoryview(self._buf)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # Shared with other threads: functions to run on the loop, and whether a wake-up
        # byte is already on its way (a hint; a spurious wake-up costs one empty turn).
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._woken = False
        self._halt = threading.Event()  # set by force(): cut pauses short
        # Loop thread only.
        self._subs: dict[SubscriptionRules, _Sub] = {}
        self._socks: dict[int, _Sock] = {}
        self._waiting: dict[int, tuple[_Sub, HandshakeJob]] = {}  # handshakes in flight
        self._heap: list[tuple[float, int, _Sub]] = []
        self._seq = itertools.count()
        self._again: list[_Sock] = []  # TLS sockets with decrypted bytes still inside OpenSSL
        self._stats_of: dict[int, SubscriptionRules] = {}  # route index -> its rules
        self._exiting = False
        self._last_drop_log = -math.inf
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failed: BaseException | None = None  # the loop itself died of a bug
        # Subscriptions whose rules raised (a bug), for /healthz; replaced, never grown.
        self.crashed: tuple[SubscriptionRules, ...] = ()

    # -- thread-safe API ------------------------------------------------------------------------

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread, soon. Any thread; never blocks."""
        self._inbox.append(fn)
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
                self._wake_w.send(b"\0")

    def add(self, rules: SubscriptionRules) -> None:
        self.call(lambda: self._add(rules))

    def stop_subscriptions(self, rules: Iterable[SubscriptionRules], done: Countdown) -> None:
        """Stop these subscriptions politely; `done` is told once per finished one."""
        targets = list(rules)
        self.call(lambda: self._stop(targets, done))

    def abort_subscriptions(self, rules: Iterable[SubscriptionRules]) -> None:
        """Release these subscriptions' sockets at once."""
        targets = list(rules)
        self.call(lambda: self._abort(targets))

    def shutdown(self) -> None:
        """Stop every subscription politely; the thread ends once all have finished."""
        self.call(self._begin_exit)

    def force(self) -> None:
        """Release every socket now; the thread ends."""
        self._halt.set()
        self.call(self._force)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:  # a shutdown before start() joins nothing
            self._thread.join(max(0.0, timeout))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not (self._exiting and not self._subs):
                self._turn()
        except BaseException as exc:  # a bug: visible in /healthz, and systemd restarts us
            self.failed = exc
            log.exception("%s: the I/O loop crashed", self.name)
        finally:
            self._close_all()

    def _turn(self) -> None:
        timeout = MAX_SELECT
        if self._inbox or self._again:
            timeout = 0.0
        elif self._heap:
            # TIMER_SLACK late at most: the deadlines due meanwhile share the turn (10,000
            # idle subscriptions ping 500 times a second; one turn each would cost more than
            # the pings).
            timeout = min(MAX_SELECT, max(0.0, self._heap[0][0] - self._clock()) + TIMER_SLACK)
        for key, mask in self._selector.select(timeout):
            state = key.data
            if state is None:
                self._woken = False
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            readable = mask & selectors.EVENT_READ
            if mask & selectors.EVENT_WRITE:
                self._flush(state)
                # A TLS read that had to wait for a write can go on now.
                readable |= state.tls and not state.out
            if readable and state.link_id in self._socks:
                self._read(state)
        if self._again:
            again, self._again = self._again, []
            for state in again:
                if state.link_id in self._socks:
                    self._read(state)
        while self._inbox:
            self._inbox.popleft()()
        self._timers()
        self._spool_chunk()

    def _read(self, state: _Sock) -> None:
        sub = state.sub
        rules = sub.rules
        sock = state.sock
        try:
            n = sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return
        except ssl.SSLWantWriteError:  # TLS must write before it can read on (renegotiation)
            self._watch(state, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except OSError as exc:
            self._input(sub, rules.transport_lost, state.link_id, describe(exc))
            return
        if not n:
            self._input(sub, rules.transport_lost, state.link_id, EOF)
            return
        try:
            rules.received(state.link_id, bytes(self._view[:n]))
        except Exception as exc:
            self._crashed(sub, exc)
            return
        if state.tls and state.link_id in self._socks and sock.pending():  # type: ignore[attr-defined]
            self._again.append(state)
        if rules.actions or rules.retime:  # most reads only carry frames: nothing to do
            self._act(sub)

    def _timers(self) -> None:
        heap = self._heap
        now = self._clock()
        while heap and heap[0][0] <= now:
            due, _, sub = heapq.heappop(heap)
            if due != sub.scheduled or sub.rules not in self._subs:
                continue  # stale: an earlier deadline replaced it, or the subscription left
            sub.scheduled = math.inf
            self._input(sub, sub.rules.tick)

    def _spool_chunk(self) -> None:
        if not self.outbox.entries:
            return
        entries, nbytes = self.outbox.take()
        if self._spool.append(entries, nbytes):
            # If the writer is behind while Redis is healthy, let it catch up (bounded; never
            # during an outage). Nothing is lost: the next frames wait in the socket buffers.
            self._spool.wait_for_writer(BACKLOG_WAIT)
            if nbytes < COALESCE_BELOW:
                # A small chunk under heavy traffic costs as much as a large one (a lock, a
                # write, a few syscalls): let a millisecond's worth of frames gather in the
                # socket buffers first. Adds at most 1 ms of latency.
                self._halt.wait(COALESCE_PAUSE)
            return
        self._refused(entries)

    def _refused(self, entries: list[Entry]) -> None:
        frames: dict[int, int] = {}
        gaps = 0
        for entry in entries:
            if entry.opcode == GAP:
                gaps += 1
            else:
                frames[entry.subscription] = frames.get(entry.subscription, 0) + 1
        for index, count in frames.items():
            rules = self._stats_of.get(index)
            if rules is not None:
                rules.stats.dropped += count
        now = self._clock()
        if now - self._last_drop_log < DROP_LOG_INTERVAL:
            return
        self._last_drop_log = now
        pending, pending_bytes = self._spool.pending()
        log.error(
            "%s: the spool refused %d frames and %d gap records (%d frames, %d bytes waiting "
            "for Redis); they are lost and counted in forwarder_messages_dropped_total",
            self.name,
            sum(frames.values()),
            gaps,
            pending,
            pending_bytes,
        )

    # -- subscriptions --------------------------------------------------------------------------

    def _add(self, rules: SubscriptionRules) -> None:
        sub = _Sub(rules)
        self._subs[rules] = sub
        self._stats_of[rules.index] = rules
        self._input(sub, rules.start)
        if self._exiting and rules in self._subs:
            self._input(sub, rules.stop)

    def _stop(self, targets: list[SubscriptionRules], done: Countdown) -> None:
        for rules in targets:
            sub = self._subs.get(rules)
            if sub is None:
                done.done()  # finished already
                continue
            sub.done = done
            self._input(sub, rules.stop)

    def _abort(self, targets: Iterable[SubscriptionRules]) -> None:
        for rules in targets:
            sub = self._subs.get(rules)
            if sub is not None:
                self._input(sub, rules.abort)

    def _begin_exit(self) -> None:
        self._exiting = True
        self._stop(list(self._subs), Countdown(len(self._subs)))

    def _force(self) -> None:
        self._exiting = True
        self._abort(list(self._subs))

    def _input(self, sub: _Sub, method: Callable[..., None], *args: object) -> None:
        """Give the rules one input, then carry out what they asked for."""
        try:
            method(*args)
        except Exception as exc:
            self._crashed(sub, exc)
            return
        self._act(sub)

    def _act(self, sub: _Sub) -> None:
        rules = sub.rules
        try:
            while rules.actions:
                actions, rules.actions = rules.actions, []
                for action in actions:
                    if type(action) is Send:
                        self._send(action.link_id, action.data)
                    elif type(action) is Listen:
                        self._listen(action.link_id)
                    elif type(action) is Release:
                        self._release(action.link_id)
                    elif type(action) is Connect:
                        self._connect(sub, action.link_id)
            if rules.finished:
                self._remove(sub)
                return
            rules.retime = False
            due = rules.deadline()
        except Exception as exc:
            self._crashed(sub, exc)
            return
        # The heap keeps one live entry per subscription (`scheduled`; others are stale and
        # skipped when popped). An earlier deadline is pushed at once; a later one only when
        # it moved by more than RESCHEDULE_SLACK (a pong moving the next ping 10 s on), so
        # a busy connection, whose every read moves its deadline a little, costs no push per
        # read, and an idle one costs one tick per ping instead of two.
        scheduled = sub.scheduled
        if due < scheduled or due > scheduled + RESCHEDULE_SLACK:
            now = self._clock()
            if due <= now:  # only after a tick that could not act yet: never a busy loop
                due = now + MIN_TICK
            sub.scheduled = due
            heapq.heappush(self._heap, (due, next(self._seq), sub))

    def _remove(self, sub: _Sub) -> None:
        if self._subs.pop(sub.rules, None) is None:
            return
        for link_id in list(sub.links):
            self._release(link_id)
        for job in sub.jobs.values():
            job.cancelled = True  # if still queued; a late socket is closed on arrival
        if sub.done is not None:
            sub.done.done()

    def _crashed(self, sub: _Sub, exc: BaseException) -> None:
        """An input raised: a bug. That subscription stops (visible in /healthz); others run."""
        rules = sub.rules
        log.error("%s: subscription crashed: %s", rules.name, exc, exc_info=exc)
        rules.failed = exc
        rules.finished = True
        rules.stats.state = State.STOPPED
        self.crashed = (*self.crashed, rules)
        self._remove(sub)

    # -- sockets --------------------------------------------------------------------------------

    def _connect(self, sub: _Sub, link_id: int) -> None:
        def deliver(result: Handshake) -> None:  # on a handshake worker thread
            self.call(lambda: self._handshake_done(link_id, result))

        job = HandshakeJob(sub.rules.subscription, deliver)
        self._waiting[link_id] = (sub, job)
        sub.jobs[link_id] = job
        self._handshakes.submit(job)

    def _handshake_done(self, link_id: int, result: Handshake) -> None:
        waiting = self._waiting.pop(link_id, None)
        if waiting is not None:
            waiting[0].jobs.pop(link_id, None)
        sock = result.sock
        if waiting is None or waiting[0].rules not in self._subs:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            return
        sub = waiting[0]
        rules = sub.rules
        if sock is None:
            assert result.error is not None
            self._input(sub, rules.handshake_failed, link_id, result.error, result.token_expires_at)
            return
        sock.setblocking(False)
        state = _Sock(sock, sub, link_id)
        self._socks[link_id] = state
        sub.links.add(link_id)
        self._input(sub, rules.handshake_succeeded, link_id, result.token_expires_at)

    def _listen(self, link_id: int) -> None:
        state = self._socks.get(link_id)
        if state is None:
            return
        self._watch(state, selectors.EVENT_READ | (selectors.EVENT_WRITE if state.out else 0))
        if state.tls and state.sock.pending():  # type: ignore[attr-defined]
            self._again.append(state)

    def _watch(self, state: _Sock, events: int) -> None:
        if events == state.events:
            return
        if not state.events:
            self._selector.register(state.sock, events, state)
        else:
            self._selector.modify(state.sock, events, state)
        state.events = events

    def _send(self, link_id: int, data: bytes) -> None:
        state = self._socks.get(link_id)
        if state is None:
            return
        if state.out:
            state.out += data  # behind what the kernel has not taken yet
            return
        state.out = data
        self._flush(state)

    def _flush(self, state: _Sock) -> None:
        while state.out:
            try:
                sent = state.sock.send(state.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as exc:
                state.out = b""
                self._input(state.sub, state.sub.rules.transport_lost, state.link_id, describe(exc))
                return
            state.out = state.out[sent:]
        reading = selectors.EVENT_READ if state.events & selectors.EVENT_READ else 0
        if state.link_id in self._socks and (state.events or state.out):
            self._watch(state, reading | (selectors.EVENT_WRITE if state.out else 0))

    def _release(self, link_id: int) -> None:
        state = self._socks.pop(link_id, None)
        if state is None:
            return
        state.sub.links.discard(link_id)
        if state.events:
            self._selector.unregister(state.sock)
            state.events = 0
        if state.out:  # the last control frame (a close echo), if the kernel takes it now
            with contextlib.suppress(OSError, ssl.SSLError):
                state.sock.send(state.out)
        with contextlib.suppress(OSError):
            state.sock.close()

    def _close_all(self) -> None:
        for link_id in list(self._socks):
            with contextlib.suppress(Exception):
                self._release(link_id)
        for rules in list(self._subs):
            rules.stats.state = State.STOPPED
        with contextlib.suppress(OSError):
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

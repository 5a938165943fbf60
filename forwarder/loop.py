"""An I/O loop: one thread multiplexing the sockets of many subscriptions with `selectors`.

The loop is thin on purpose: it reads what is ready into one shared buffer, feeds the bytes to
the subscription's rules (subscription.py, sans-I/O), performs the actions they answer with
(connect through the handshake pool, listen, write a control frame, release), keeps their
deadlines in one heap, and hands everything they produced in a turn to the spool as one chunk.
No thread and no read buffer per subscription: a daemon with 10,000 subscriptions runs a few
of these loops (one by default: they share the interpreter lock) and one handshake pool.

TLS (wss://) goes through the same path: the handshake's SSLSocket is switched to
non-blocking mode; a read that needs more bytes raises SSLWantReadError (wait for readable),
one that needs to write first raises SSLWantWriteError (wait for writable), and decrypted bytes
already inside OpenSSL (`pending()`) are read without waiting for the selector. The polite
close is the same for both: our close frame, then reading until the server's echo.

Threads: everything here runs on the loop's thread, except the methods documented as
thread-safe (`call`, `add`, `input`, `stop_subscriptions`, `abort_subscriptions`, `shutdown`,
`force`), which only queue a function for the loop and wake it through a socket pair.
"""

from __future__ import annotations

import contextlib
import logging
import math
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterable

from forwarder.actions import Connect, Listen, Release, Send
from forwarder.handshake import Handshake, HandshakeJob, HandshakePool, describe
from forwarder.spool import DiskSpool
from forwarder.stats import State
from forwarder.subscription import SubscriptionRules
from forwarder.turns import Inbox, SpoolFeed, Timers

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024  # the loop's one read buffer: at most this much per socket and turn
MAX_SELECT = 1.0  # the loop wakes at least this often (a safety net, not a timer)
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
    __slots__ = ("early", "events", "link_id", "out", "sock", "sub", "tls")

    def __init__(self, sock: socket.socket, sub: _Sub, link_id: int, early: bytes = b"") -> None:
        self.sock = sock
        self.sub = sub
        self.link_id = link_id
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.out = b""  # control frames the kernel did not take yet
        # Read past the upgrade's headers by the handshake: the connection's first bytes,
        # given to the rules before anything from the socket, once they listen.
        self.early = early
        self.events = 0  # what the selector watches (0: not registered)

    def watch(self, selector: selectors.BaseSelector, events: int) -> None:
        if events == self.events:
            return
        if not self.events:
            selector.register(self.sock, events, self)
        else:
            selector.modify(self.sock, events, self)
        self.events = events

    def write(self, selector: selectors.BaseSelector, data: bytes) -> OSError | None:
        """Queue a control frame and write what the kernel takes; the error if the socket
        failed."""
        if self.out:
            self.out += data  # behind what the kernel has not taken yet
            return None
        self.out = data
        return self.flush(selector)

    def flush(self, selector: selectors.BaseSelector) -> OSError | None:
        """Write what is queued; watch for writability while some is left."""
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as exc:
                self.out = b""
                return exc
            self.out = self.out[sent:]
        if self.events or self.out:
            reading = self.events & selectors.EVENT_READ
            self.watch(selector, reading | (selectors.EVENT_WRITE if self.out else 0))
        return None

    def close(self, selector: selectors.BaseSelector) -> None:
        if self.events:
            selector.unregister(self.sock)
            self.events = 0
        if self.out:  # the last control frame (a close echo), if the kernel takes it now
            with contextlib.suppress(OSError, ssl.SSLError):
                self.sock.send(self.out)
        with contextlib.suppress(OSError):
            self.sock.close()


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
        self._handshakes = handshakes
        self._clock = clock  # monotonic
        self._selector = selectors.DefaultSelector()
        self._buf = bytearray(read_bytes)
        self._view = memoryview(self._buf)
        self._inbox = Inbox(self._selector)  # the one part other threads touch
        self._halt = threading.Event()  # set by force(): cut pauses short
        self._feed = SpoolFeed(name, spool, clock, self._halt)
        self.outbox = self._feed.outbox  # shared by the rules of this loop's subscriptions
        # Loop thread only.
        self._timers: Timers[_Sub] = Timers(clock)
        self._subs: dict[SubscriptionRules, _Sub] = {}
        self._socks: dict[int, _Sock] = {}
        self._waiting: dict[int, tuple[_Sub, HandshakeJob]] = {}  # handshakes in flight
        self._again: list[_Sock] = []  # TLS sockets with decrypted bytes still inside OpenSSL
        self._exiting = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failed: BaseException | None = None  # the loop itself died of a bug
        # Subscriptions whose rules raised (a bug), for /healthz; replaced, never grown.
        self.crashed: tuple[SubscriptionRules, ...] = ()

    # -- thread-safe API ------------------------------------------------------------------------

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread, soon. Any thread; never blocks."""
        self._inbox.call(fn)

    def add(self, rules: SubscriptionRules) -> None:
        self.call(lambda: self._add(rules))

    def stop_subscriptions(self, rules: Iterable[SubscriptionRules], done: Countdown) -> None:
        """Stop these subscriptions politely; `done` is told once per finished one."""
        targets = list(rules)
        self.call(lambda: self._stop(targets, done))

    def input(self, rules: SubscriptionRules, fn: Callable[[], None]) -> None:
        """Give `rules` the input `fn` on the loop thread (ignored once they finished)."""
        self.call(lambda: self._input(self._subs[rules], fn) if rules in self._subs else None)

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
        timeout = 0.0
        if not (self._inbox or self._again):
            # TIMER_SLACK late at most: the deadlines due meanwhile share the turn (10,000
            # idle subscriptions ping 500 times a second; one turn each would cost more than
            # the pings).
            wait = self._timers.next_due() - self._clock() + TIMER_SLACK
            timeout = min(MAX_SELECT, max(0.0, wait))
        for key, mask in self._selector.select(timeout):
            state = key.data
            if state is None:
                self._inbox.woken()
                continue
            readable = mask & selectors.EVENT_READ
            if mask & selectors.EVENT_WRITE:
                self._flushed(state, state.flush(self._selector))
                # A TLS read that had to wait for a write can go on now.
                readable |= state.tls and not state.out
            if readable and state.link_id in self._socks:
                self._read(state)
        if self._again:
            again, self._again = self._again, []
            for state in again:
                if state.link_id in self._socks:
                    self._read(state)
        self._inbox.run()
        for sub in self._timers.due(lambda sub: sub.rules in self._subs):
            self._input(sub, sub.rules.tick)
        self._feed.flush()

    def _read(self, state: _Sock) -> None:
        sub = state.sub
        rules = sub.rules
        sock = state.sock
        if state.early:  # the handshake's leftover first; the selector reports the rest
            data, state.early = state.early, b""
            self._received(state, data)
            return
        try:
            n = sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return
        except ssl.SSLWantWriteError:  # TLS must write before it can read on (renegotiation)
            state.watch(self._selector, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except OSError as exc:
            self._input(sub, rules.transport_lost, state.link_id, describe(exc))
            return
        if not n:
            self._input(sub, rules.transport_lost, state.link_id, EOF)
            return
        self._received(state, bytes(self._view[:n]))

    def _received(self, state: _Sock, data: bytes) -> None:
        sub = state.sub
        rules = sub.rules
        sock = state.sock
        try:
            rules.received(state.link_id, data)
        except Exception as exc:
            self._crashed(sub, exc)
            return
        if state.tls and state.link_id in self._socks and sock.pending():  # type: ignore[attr-defined]
            self._again.append(state)
        if rules.actions or rules.retime:  # most reads only carry frames: nothing to do
            self._act(sub)

    # -- subscriptions --------------------------------------------------------------------------

    def _add(self, rules: SubscriptionRules) -> None:
        sub = _Sub(rules)
        self._subs[rules] = sub
        self._feed.register(rules.index, rules.stats)
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
        self._timers.schedule(sub, due)

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
        state = _Sock(sock, sub, link_id, result.early)
        self._socks[link_id] = state
        sub.links.add(link_id)
        self._input(sub, rules.handshake_succeeded, link_id, result.token_expires_at)

    def _listen(self, link_id: int) -> None:
        state = self._socks.get(link_id)
        if state is None:
            return
        state.watch(
            self._selector, selectors.EVENT_READ | (selectors.EVENT_WRITE * bool(state.out))
        )
        if state.early or (state.tls and state.sock.pending()):  # type: ignore[attr-defined]
            self._again.append(state)

    def _send(self, link_id: int, data: bytes) -> None:
        state = self._socks.get(link_id)
        if state is not None:
            self._flushed(state, state.write(self._selector, data))

    def _flushed(self, state: _Sock, error: OSError | None) -> None:
        if error is not None and state.link_id in self._socks:
            self._input(state.sub, state.sub.rules.transport_lost, state.link_id, describe(error))

    def _release(self, link_id: int) -> None:
        state = self._socks.pop(link_id, None)
        if state is not None:
            state.sub.links.discard(link_id)
            state.close(self._selector)

    def _close_all(self) -> None:
        for link_id in list(self._socks):
            with contextlib.suppress(Exception):
                self._release(link_id)
        for rules in list(self._subs):
            rules.stats.state = State.STOPPED
        self._inbox.close()
        with contextlib.suppress(OSError):
            self._selector.close()

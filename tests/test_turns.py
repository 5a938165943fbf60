"""The parts of a loop turn without sockets: the deadline heap, the inbox, the spool feed."""

from __future__ import annotations

import functools
import logging
import math
import selectors
import threading
from typing import cast

import pytest

from forwarder.spool import GAP, DiskSpool, Entry
from forwarder.stats import SubscriptionStats
from forwarder.turns import MIN_TICK, RESCHEDULE_SLACK, Inbox, SpoolFeed, Timers


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.scheduled = math.inf


def names(timers: Timers[Item]) -> list[str]:
    return [item.name for item in timers.due(lambda item: True)]


def test_timers_pop_what_is_due_in_order_and_skip_replaced_entries() -> None:
    """Earlier deadlines replace later ones at once; only the live entry of each item pops."""
    now = [0.0]
    timers: Timers[Item] = Timers(lambda: now[0])
    a, b = Item("a"), Item("b")
    timers.schedule(a, 5.0)
    timers.schedule(b, 3.0)
    timers.schedule(a, 2.0)  # earlier: replaces a's entry at 5.0
    now[0] = 4.0
    assert names(timers) == ["a", "b"]
    now[0] = 6.0
    assert names(timers) == []  # a's old entry at 5.0 was stale


def test_a_later_deadline_keeps_its_entry_unless_it_moved_by_more_than_the_slack() -> None:
    """A read moving the deadline a little costs no push (an early pop is harmless); a pong
    moving it 10 s does push, so the early entry is skipped."""
    now = [0.0]
    timers: Timers[Item] = Timers(lambda: now[0])
    a = Item("a")
    timers.schedule(a, 10.0)
    timers.schedule(a, 10.0 + RESCHEDULE_SLACK / 2)
    assert a.scheduled == 10.0
    timers.schedule(a, 20.0)
    assert a.scheduled == 20.0
    now[0] = 15.0
    assert names(timers) == []
    now[0] = 20.0
    assert names(timers) == ["a"]


def test_a_deadline_already_past_waits_min_tick_and_gone_items_never_pop() -> None:
    """A tick that could not act yet is not retried in a busy loop; `live` filters items."""
    now = [100.0]
    timers: Timers[Item] = Timers(lambda: now[0])
    a, b = Item("a"), Item("b")
    timers.schedule(a, 50.0)
    timers.schedule(b, 100.0 + MIN_TICK)
    assert a.scheduled == 100.0 + MIN_TICK
    now[0] += MIN_TICK
    assert [i.name for i in timers.due(lambda item: item is not b)] == ["a"]


def test_inbox_runs_functions_posted_from_another_thread_after_waking_the_selector() -> None:
    """call() from any thread wakes a selector waiting on the inbox; run() executes in order."""
    selector = selectors.DefaultSelector()
    inbox = Inbox(selector)
    ran: list[int] = []

    def post() -> None:
        for n in range(3):
            inbox.call(functools.partial(ran.append, n))

    try:
        poster = threading.Thread(target=post)
        poster.start()
        poster.join(5)
        events = selector.select(5.0)
        assert [key.data for key, _ in events] == [None]
        inbox.woken()
        assert inbox
        inbox.run()
        assert ran == [0, 1, 2]
        assert not inbox
        assert selector.select(0) == []  # the wake-up bytes were drained
    finally:
        inbox.close()
        selector.close()


class RefusingSpool:
    def __init__(self) -> None:
        self.calls = 0

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        self.calls += 1
        return False

    def pending(self) -> tuple[int, int]:
        return 7, 700

    def wait_for_writer(self, timeout: float) -> None:
        """Never reached: the spool refuses."""


def test_refused_chunks_count_dropped_frames_per_subscription_and_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chunk the spool refuses: each frame counted as dropped on its subscription, gap
    records only logged; one ERROR per DROP_LOG_INTERVAL however many chunks."""
    caplog.set_level(logging.ERROR)
    spool = RefusingSpool()
    feed = SpoolFeed("io-0", cast(DiskSpool, spool), lambda: 0.0, threading.Event())
    a = SubscriptionStats("main", "a", "a")
    b = SubscriptionStats("main", "b", "b")
    feed.register(0, a)
    feed.register(1, b)
    for _ in range(2):
        feed.outbox.entries += [
            Entry(0, 1, b"{}", 1.0),
            Entry(1, 1, b"{}", 1.0),
            Entry(0, 1, b"[]", 1.0),
            Entry(0, GAP, b"{}", 1.0),
        ]
        feed.outbox.nbytes += 8
        feed.flush()
    assert (a.dropped, b.dropped) == (4, 2)
    assert spool.calls == 2
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1
    assert "refused 3 frames and 1 gap records" in errors[0]
    feed.flush()  # nothing gathered: no call
    assert spool.calls == 2

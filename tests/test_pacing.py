"""The writer's pacing rules, without Redis: shrink on a timeout, grow back on quick replies."""

from __future__ import annotations

from forwarder.pacing import GROW_AFTER, MAX_PATIENCE, Pacer


def test_a_timeout_halves_the_batch_and_doubles_the_timeout_up_to_a_cap() -> None:
    """Each timeout halves the size of what was sent and doubles the wait, never past 8x."""
    pacer = Pacer(1000, 1.0)
    pacer.timed_out(1000)
    assert (pacer.limit, pacer.timeout) == (500, 2.0)
    pacer.timed_out(300)  # a smaller, final part of a batch timed out
    assert (pacer.limit, pacer.timeout) == (150, 4.0)
    for _ in range(20):  # bounded
        pacer.timed_out(pacer.limit)
    assert pacer.limit == 1
    assert pacer.timeout == MAX_PATIENCE


def test_slow_replies_change_nothing_quick_ones_grow_back_in_steps() -> None:
    """Replies over half the timeout keep the size; quick ones halve the wait and, after a
    run of GROW_AFTER, double the size, until batch_max and the configured timeout."""
    pacer = Pacer(64, 1.0)
    pacer.timed_out(64)
    pacer.timed_out(32)
    assert (pacer.limit, pacer.timeout) == (16, 4.0)
    for _ in range(50):
        assert not pacer.answered(0.9)  # slow: growing now would time out again
    assert (pacer.limit, pacer.timeout) == (16, 4.0)
    assert pacer.answered(0.1)
    assert pacer.timeout == 2.0
    for _ in range(GROW_AFTER - 2):
        pacer.answered(0.1)
    assert pacer.limit == 16  # one short of a run
    pacer.answered(0.6)  # a slow reply breaks the run
    for _ in range(GROW_AFTER - 1):
        pacer.answered(0.1)
    assert pacer.limit == 16
    pacer.answered(0.1)
    assert pacer.limit == 32
    for _ in range(GROW_AFTER):
        pacer.answered(0.1)
    assert pacer.limit == 64
    assert pacer.timeout == 1.0
    assert pacer.normal()
    assert not pacer.answered(0.1)

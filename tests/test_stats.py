"""Counters shared between threads: blind time that never goes backwards."""

from __future__ import annotations

from forwarder.stats import SubscriptionStats


def test_blind_seconds_never_go_backwards_when_a_gap_closes() -> None:
    """The open interval is read with the reader's clock: closing it must not lower the sum."""
    stats = SubscriptionStats("main", "messages.upsert", "s")
    stats.blind = (5.0, 100.0)
    assert stats.blind_seconds(110.5) == 15.5
    stats.blind = (15.4, None)  # closed with the loop's clock, a little earlier
    assert stats.blind_seconds(111.0) == 15.5
    stats.blind = (20.0, None)
    assert stats.blind_seconds(112.0) == 20.0

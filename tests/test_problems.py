"""The shared judgement of an unhealthy subscription, with a fake clock (no sockets)."""

from __future__ import annotations

from forwarder.config import DEFAULT_STALL_AFTER
from forwarder.problems import (
    SAMPLE_EVERY,
    STORM_RECONNECTS,
    STORM_WINDOW,
    TOKEN_EXPIRING_SECONDS,
    HealthPolicy,
    ProblemFinder,
)
from forwarder.stats import State, SubscriptionStats

START = 1_800_000_000.0  # unix time the daemon started


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finder(clock: FakeClock | None = None) -> ProblemFinder:
    policy = HealthPolicy(dict(DEFAULT_STALL_AFTER), started_at=START)
    return ProblemFinder(policy, clock or FakeClock())


def sub(event: str = "messages.upsert", state: State = State.CONNECTED) -> SubscriptionStats:
    s = SubscriptionStats("main", event, event)
    s.state = state
    return s


def test_a_connected_subscription_with_recent_traffic_has_no_problem() -> None:
    """Connected and heard from within its threshold: healthy."""
    s = sub()
    s.last_message_at = START + 100
    assert finder().find([s], START + 200) == [()]


def test_not_connected_is_down_and_a_401_makes_it_auth() -> None:
    """Every state but connected is down; a 401/403 last handshake adds auth, a 502 does not."""
    subs = [sub(state=state) for state in State if state is not State.CONNECTED]
    rejected = sub(state=State.BACKOFF)
    rejected.last_handshake_status = "401"
    forbidden = sub(state=State.BACKOFF)
    forbidden.last_handshake_status = "403"
    proxy = sub(state=State.BACKOFF)
    proxy.last_handshake_status = "502"
    found = finder().find([*subs, rejected, forbidden, proxy], START)
    assert found == [("down",)] * len(subs) + [("down", "auth"), ("down", "auth"), ("down",)]


def test_a_leftover_route_of_the_spool_is_never_unhealthy() -> None:
    """Frames of a subscription no longer configured drain without a connection: no problem."""
    s = sub(state=State.STOPPED)
    s.configured = False
    assert finder().find([s], START) == [()]


def test_stalled_uses_the_events_threshold_and_the_start_when_nothing_came() -> None:
    """messages.upsert stalls after 900 s, others after 3600 s, qrcode.updated never."""
    upsert = sub("messages.upsert")
    upsert.last_message_at = START
    chats = sub("chats.update")
    chats.last_message_at = START
    never = sub("chats.upsert")  # nothing since the start: silent since START
    qrcode = sub("qrcode.updated")
    subs = [upsert, chats, never, qrcode]
    f = finder()
    assert f.find(subs, START + 899) == [(), (), (), ()]
    assert f.find(subs, START + 901) == [("stalled",), (), (), ()]
    assert f.find(subs, START + 3601) == [("stalled",), ("stalled",), ("stalled",), ()]
    upsert.last_message_at = START + 3000  # traffic again: healthy again
    assert f.find(subs, START + 3601)[0] == ()


def test_configured_thresholds_replace_the_defaults() -> None:
    """stall_after per event and a default of 0 (never) are what the policy applies."""
    policy = HealthPolicy({"default": 0.0, "call.upsert": 60.0}, started_at=START)
    f = ProblemFinder(policy, FakeClock())
    assert f.find([sub("chats.update"), sub("call.upsert")], START + 61) == [(), ("stalled",)]


def test_a_reconnect_storm_is_counted_over_the_window_only() -> None:
    """STORM_RECONNECTS reconnects within the window: reconnecting; they age out after it."""
    clock = FakeClock()
    f = finder(clock)
    s = sub()
    s.last_message_at = START
    now = START + 10
    assert f.find([s], now) == [()]  # first sample: the baseline
    s.reconnects = STORM_RECONNECTS - 1
    clock.now += SAMPLE_EVERY
    assert f.find([s], now) == [()]
    s.reconnects = STORM_RECONNECTS
    clock.now += SAMPLE_EVERY
    assert f.find([s], now) == [("reconnecting",)]
    # No more reconnects: once the samples before the storm are older than the window,
    # the storm is over.
    for _ in range(int(STORM_WINDOW / SAMPLE_EVERY) + 2):
        clock.now += SAMPLE_EVERY
        f.find([s], now)
    assert f.find([s], now) == [()]


def test_reconnects_before_the_first_look_are_not_a_storm() -> None:
    """A long-lived process with many old reconnects is not flagged on its first scrape."""
    s = sub()
    s.last_message_at = START
    s.reconnects = 500
    assert finder().find([s], START + 10) == [()]


def test_a_subscription_added_by_a_reload_counts_from_zero() -> None:
    """Subscriptions beyond the sampled list (a reload appended them) have a baseline of 0."""
    clock = FakeClock()
    f = finder(clock)
    old = sub()
    old.last_message_at = START
    f.find([old], START)
    new = sub("chats.update")
    new.last_message_at = START
    new.reconnects = STORM_RECONNECTS
    assert f.find([old, new], START) == [(), ("reconnecting",)]


def test_displaced_while_flapping_and_token_expiring_within_three_days() -> None:
    """The watchdog standing down is displaced; an exp under 3 days away (or past) expiring."""
    flapping = sub()
    flapping.last_message_at = START
    flapping.flapping_until = START + 60
    soon = sub()
    soon.last_message_at = START
    soon.token_expires_at = START + TOKEN_EXPIRING_SECONDS - 1
    later = sub()
    later.last_message_at = START
    later.token_expires_at = START + TOKEN_EXPIRING_SECONDS + 60
    found = finder().find([flapping, soon, later], START + 1)
    assert found == [("displaced",), ("token_expiring",), ()]
    assert finder().find([flapping], START + 61) == [()]  # the pause is over

"""Rendezvous hashing: balanced, deterministic, and minimal movement on join and leave."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.fleet.assignment import assign, owner
from forwarder.fleet.keys import Key

names = st.lists(
    st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True), min_size=1, max_size=8, unique=True
)


def keys(n: int, salt: str = "") -> list[Key]:
    return [(f"src{salt}{i // 13}", f"event.{i % 13}") for i in range(n)]


@settings(max_examples=50)
@given(members=names, n=st.integers(0, 300), salt=st.text(max_size=4))
def test_every_subscription_goes_to_one_listed_member(
    members: list[str], n: int, salt: str
) -> None:
    """Each key gets exactly one owner, from the members given, whatever their order."""
    ks = keys(n, salt)
    result = assign(ks, members)
    assert set(result) == set(ks)
    assert set(result.values()) <= set(members)
    assert result == assign(ks, list(reversed(members)))
    assert all(result[k] == owner(k, members) for k in ks)


@settings(max_examples=50)
@given(
    members=names,
    newcomer=st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True),
    salt=st.text(max_size=4),
)
def test_a_join_moves_only_what_the_newcomer_takes(
    members: list[str], newcomer: str, salt: str
) -> None:
    """After a join, every key that changed owner went to the newcomer."""
    if newcomer in members:
        return
    ks = keys(200, salt)
    before = assign(ks, members)
    after = assign(ks, [*members, newcomer])
    moved = {k for k in ks if before[k] != after[k]}
    assert all(after[k] == newcomer for k in moved)
    assert moved == {k for k in ks if after[k] == newcomer}


@settings(max_examples=50)
@given(members=names.filter(lambda m: len(m) >= 2), salt=st.text(max_size=4), data=st.data())
def test_a_leave_moves_only_the_leavers_subscriptions(
    members: list[str], salt: str, data: st.DataObject
) -> None:
    """After a member leaves, only its keys change owner; the others stay where they were."""
    leaver = data.draw(st.sampled_from(members))
    ks = keys(200, salt)
    before = assign(ks, members)
    after = assign(ks, [m for m in members if m != leaver])
    for k in ks:
        if before[k] != leaver:
            assert after[k] == before[k]
        else:
            assert after[k] != leaver


@settings(max_examples=50)
@given(
    members=names.filter(lambda m: len(m) >= 2), n=st.integers(200, 2000), salt=st.text(max_size=4)
)
def test_the_load_is_balanced_within_binomial_bounds(members: list[str], n: int, salt: str) -> None:
    """Each member's share stays within 6 standard deviations of n/m (binomial spread)."""
    loads = Counter(assign(keys(n, salt), members).values())
    p = 1 / len(members)
    mean = n * p
    bound = 6 * math.sqrt(n * p * (1 - p)) + 1
    for member in members:
        assert abs(loads[member] - mean) <= bound, (member, loads[member], mean, bound)


def test_ten_thousand_subscriptions_over_four_members_are_within_three_percent() -> None:
    """At scale the spread is small: 10,000 keys over 4 members, each within 3% of 2,500."""
    loads = Counter(assign(keys(10_000), ["fw-a", "fw-b", "fw-c", "fw-d"]).values())
    assert all(abs(load - 2500) <= 75 for load in loads.values()), loads


def test_no_member_no_assignment() -> None:
    """Without an eligible member nothing is assigned (nobody acquires)."""
    assert assign(keys(5), []) == {}
    assert owner(("a", "b"), []) is None

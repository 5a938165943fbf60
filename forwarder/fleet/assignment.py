"""Which member should run each subscription: rendezvous (highest random weight) hashing.

Every member computes the same answer from the same inputs (the subscriptions and the names
of the eligible members), with no coordination. Each (member, subscription) pair gets a
pseudo-random 64-bit weight; the subscription goes to the member with the highest one. When a
member joins, it takes exactly the subscriptions for which it now has the highest weight
(about 1/n of them) and nothing else moves; when a member leaves, only its own
subscriptions move, each to its second choice. The load per member is binomial: with k
subscriptions over n members, about k/n each, give or take a few sqrt(k/n)
(tests/test_fleet_assignment.py checks both properties).

Pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import blake2b

from forwarder.fleet.keys import Key

_MASK = (1 << 64) - 1


def _hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


def _key_hash(key: Key) -> int:
    return _hash(f"{key[0]}\x00{key[1]}")


def _mix(x: int) -> int:
    """SplitMix64's finaliser: every input bit flips about half the output bits."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def weight(member: str, key: Key) -> int:
    """The pair's weight: the member's and the subscription's 64-bit BLAKE2b hashes, mixed
    (one hash per member and per key, so assigning n keys over m members costs n + m hashes
    and n * m cheap mixes)."""
    return _mix(_hash(member) ^ _key_hash(key))


def _best(key_hash: int, members: Sequence[tuple[int, str]]) -> str:
    # ties (never seen in practice) go to the larger name
    return max(members, key=lambda m: (_mix(m[0] ^ key_hash), m[1]))[1]


def owner(key: Key, members: Iterable[str]) -> str | None:
    """The member that should run `key`; None when there is no eligible member."""
    hashed = [(_hash(m), m) for m in set(members)]
    return _best(_key_hash(key), hashed) if hashed else None


def assign(keys: Iterable[Key], members: Iterable[str]) -> dict[Key, str]:
    """{subscription: member} for every key; empty when there is no eligible member."""
    hashed = [(_hash(m), m) for m in sorted(set(members))]
    if not hashed:
        return {}
    return {key: _best(_key_hash(key), hashed) for key in keys}

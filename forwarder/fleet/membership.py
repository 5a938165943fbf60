"""A member's view of the group: who is alive, who may take subscriptions, who disagrees.

Built from heartbeat replies (protocol.HeartbeatReply); pure, no I/O. Not thread-safe: the
owning FleetMember guards it with its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from forwarder.fleet.assignment import assign
from forwarder.fleet.keys import Key
from forwarder.fleet.protocol import HeartbeatReply, LiveMember, MemberRecord

log = logging.getLogger(__name__)


class MembershipView:
    """The last membership Redis reported, and the epoch it is in."""

    def __init__(self, name: str, incarnation: str) -> None:
        self.name = name
        self.incarnation = incarnation
        self.live: dict[str, LiveMember] = {}
        self.server_ms: int | None = None
        self.epoch_ms: int | None = None
        self.epoch_changes = 0  # times Redis was seen to have lost the fleet's state
        self.conflict: MemberRecord | None = None  # another process with our name
        self.drain_requested = False
        self.registered = False  # our own heartbeat was taken in the last reply

    def apply(self, reply: HeartbeatReply) -> bool:
        """Take a heartbeat reply; True when it shows a new epoch (Redis lost its state)."""
        changed = self.epoch_ms is not None and reply.epoch_ms != self.epoch_ms
        if changed:
            self.epoch_changes += 1
        self.epoch_ms = reply.epoch_ms
        self.server_ms = reply.server_ms
        self.live = {m.record.name: m for m in reply.members}
        self.conflict = reply.conflict
        self.drain_requested = reply.drain_requested
        me = self.live.get(self.name)
        self.registered = (
            reply.conflict is None and me is not None and me.record.incarnation == self.incarnation
        )
        return changed

    def eligible(self, self_draining: bool) -> list[str]:
        """Names of the members that may take subscriptions: alive and not draining. Every
        member computes this from the same records, so they agree on the assignment."""
        names = [n for n, m in self.live.items() if not m.record.draining and n != self.name]
        if self.registered and not self_draining:
            names.append(self.name)
        return sorted(names)

    def disagreeing(self, digest: str) -> list[str]:
        """Live members that were given a different set of subscriptions than we were."""
        return sorted(
            n for n, m in self.live.items() if n != self.name and m.record.digest != digest
        )

    def last_beat_ms(self, name: str) -> int | None:
        member = self.live.get(name)
        return None if member is None else member.last_beat_ms

    def epoch_is_young(self, span_ms: int) -> bool:
        """Whether Redis started keeping the fleet's state less than `span_ms` ago."""
        if self.epoch_ms is None or self.server_ms is None:
            return False
        return self.server_ms - self.epoch_ms < span_ms


class AssignmentCache:
    """`assignment.assign()` recomputed only when the candidates or the members change."""

    def __init__(self) -> None:
        self._inputs: tuple[int, tuple[str, ...]] | None = None
        self._result: dict[Key, str] = {}

    def get(
        self, version: int, candidates: Sequence[Key], members: Sequence[str]
    ) -> dict[Key, str]:
        inputs = (version, tuple(members))
        if inputs != self._inputs:
            self._result = assign(candidates, members)
            self._inputs = inputs
        return self._result

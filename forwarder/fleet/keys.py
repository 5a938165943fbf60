"""Redis key names of one fleet group, and the lease token format.

Every key carries the group in a hash tag (`forwarder:fleet:{GROUP}:...`), so all of them
live in one Redis Cluster slot and each Lua script may touch several of them.

    {P}:epoch             server time (ms) when this Redis first saw the group; a missing
                          epoch means Redis lost the fleet's state (restart without
                          persistence, FLUSHALL): see docs/fleet.md "When Redis fails"
    {P}:members           ZSET member name -> server time (ms) of its last heartbeat
    {P}:member:NAME       the member's record (JSON), PX = lease_ttl: it is alive while
                          this key exists
    {P}:drain             HASH member name -> server time (ms) a drain was asked for
    {P}:fences            HASH subscription -> last fencing number handed out
    {P}:holders           HASH subscription -> JSON {token, state, at}: who acquired it
                          last and whether they released it (for failover gap records)
    {P}:lease:SUB         the lease: the holder's token, PX = lease_ttl
    {P}:handover:SUB      a planned move (JSON {from, to, state, successor, at})

SUB is `source/event` (neither a source name nor an event name contains '/').
A token is `FENCE NAME INCARNATION`: the fencing number (unique per acquisition), the
member's name and a random id of the member process, so two processes that share a name
never mistake each other's leases.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str, str]  # (source name, event): the same key desired.py uses


def sub_id(key: Key) -> str:
    """The subscription's name inside Redis keys and hashes: `source/event`."""
    return f"{key[0]}/{key[1]}"


def parse_sub_id(text: str) -> Key:
    source, _, event = text.partition("/")
    return (source, event)


@dataclass(frozen=True)
class Token:
    """One acquisition of a lease."""

    fence: int
    member: str
    incarnation: str

    def __str__(self) -> str:
        return f"{self.fence} {self.member} {self.incarnation}"

    @classmethod
    def parse(cls, text: str) -> Token | None:
        """The token in a lease value; None if the value is not one (never raises)."""
        parts = text.split(" ")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2])


class FleetKeys:
    """The key names of one group."""

    def __init__(self, group: str) -> None:
        self.prefix = f"forwarder:fleet:{{{group}}}"
        self.epoch = f"{self.prefix}:epoch"
        self.members = f"{self.prefix}:members"
        self.drain = f"{self.prefix}:drain"
        self.fences = f"{self.prefix}:fences"
        self.holders = f"{self.prefix}:holders"
        self.lease_prefix = f"{self.prefix}:lease:"

    def member(self, name: str) -> str:
        return f"{self.prefix}:member:{name}"

    def lease(self, key: Key) -> str:
        return self.lease_prefix + sub_id(key)

    def handover(self, key: Key) -> str:
        return f"{self.prefix}:handover:{sub_id(key)}"

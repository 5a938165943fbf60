"""What a stream and its consumer groups look like right now: one atomic, bounded read.

`OBSERVE` is a read-only Lua script: one call per stream returns its length, first and last
IDs, the counters Redis keeps (entries added, the largest deleted ID) and per consumer group
its consumers, pending count, last-delivered ID, lag and the idle time of its oldest pending
entry. Being a script, it is one consistent snapshot (the retention step and the trimmed-entry
accounting depend on that) and it returns IDs only, never the entries' payloads, which
`XINFO STREAM` would otherwise send for the first and last entry.

Lag (entries still in the stream that the group has not been delivered yet) is computed here
because Redis 7's own `lag` is nil in some states and wrong in one:
- the group is at the end (last-delivered >= last-generated ID): 0;
- the group is behind the first entry (what it would read next was trimmed): every entry in
  the stream is undelivered, so lag = length. Redis 7 also counts the trimmed entries in its
  `lag`, and keeps counting them after the group skips over the gap (its read counter is
  only incremented); those entries are counted in `forwarder_stream_trimmed_unread_total`
  instead;
- inside the stream: Redis' `lag` when it reports one that is possible (below the length);
  otherwise (nil after XDEL ahead of the group or XGROUP SETID, or impossible after a skipped
  gap) the entries after last-delivered are counted, up to `scan` of them; beyond that the
  lag is estimated from the entry-ID times and flagged as an estimate.

See docs/consumers.md for the sources of these rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import redis

LAG_SCAN = 1000  # entries counted at most per group when Redis cannot tell the lag

# Shared by OBSERVE and retention.py's TRIM (Redis runs Lua 5.1).
LUA_LIBRARY = r"""
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function cmp(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  if am ~= bm then return am < bm and -1 or 1 end
  if as ~= bs then return as < bs and -1 or 1 end
  return 0
end
local function nextid(id)
  local m, s = parse(id)
  return string.format('%.0f-%.0f', m, s + 1)
end
local function kv(reply)
  local t = {}
  for i = 1, #reply, 2 do t[reply[i]] = reply[i + 1] end
  return t
end
-- lag kinds: 0 exact, 1 Redis' own counter (may overstate after a skipped gap), 2 estimate
local function lag_of(key, n, first, last, l, redis_lag, scan)
  if n == 0 or cmp(l, last) >= 0 then return 0, 0 end
  if cmp(l, first) < 0 then return n, 0 end
  if redis_lag and redis_lag >= 0 and redis_lag < n then return redis_lag, 1 end
  local c = #redis.call('XRANGE', key, '(' .. l, '+', 'COUNT', scan + 1)
  if c <= scan then return c, 0 end
  local lm = parse(l)
  local fm = parse(first)
  local tm = parse(last)
  local est = math.floor(n * (tm - lm) / math.max(1, tm - fm))
  return math.max(scan + 1, math.min(n - 1, est)), 2
end
-- {1, length, first, last, entries_added, max_deleted, groups} | {0} missing | {-1, type}
local function facts(key, scan)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return {0} end
  if t ~= 'stream' then return {-1, t} end
  local s = kv(redis.call('XINFO', 'STREAM', key))
  local n = s['length']
  local first = s['first-entry'] and s['first-entry'][1] or ''
  local last = s['last-generated-id']
  local groups = {}
  for _, raw in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local g = kv(raw)
    local l = g['last-delivered-id']
    local lag, kind = lag_of(key, n, first, last, l, g['lag'], scan)
    local idle = -1
    if g['pending'] > 0 then
      local p = redis.call('XPENDING', key, g['name'], '-', '+', 1)
      if #p > 0 then idle = p[1][3] end
    end
    groups[#groups + 1] = {g['name'], g['consumers'], g['pending'], l,
      g['entries-read'] or -1, lag, kind, idle}
  end
  return {1, n, first, last, s['entries-added'], s['max-deleted-entry-id'], groups}
end
"""

# KEYS: the streams. ARGV: scan. One reply per key, in KEYS' order: one call per chunk of
# streams, not one per stream, keeps the monitor's own cost (packing, parsing) low at fleet
# scale. Not for a Cluster, whose keys of one call must share a slot (the monitor is off there).
OBSERVE = (
    "#!lua flags=no-writes\n"
    + LUA_LIBRARY
    + r"""
local scan = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do out[i] = facts(key, scan) end
return out
"""
)


class LagKind(enum.IntEnum):
    EXACT = 0
    REDIS = 1  # Redis' own counter: exact unless the group skipped a trimmed gap (then high)
    ESTIMATE = 2


@dataclass(frozen=True)
class GroupFacts:
    name: str
    consumers: int
    pending: int
    last_delivered: str
    entries_read: int | None  # Redis' logical read counter (None when it has none)
    lag: int
    lag_kind: LagKind
    oldest_pending_idle_ms: int | None  # idle time of the oldest pending entry


@dataclass(frozen=True)
class StreamFacts:
    """One stream at one instant. `exists` False: no such key (length 0, no groups)."""

    exists: bool
    length: int = 0
    first_id: str | None = None
    last_id: str = "0-0"  # last-generated ID (stays after the entries are trimmed)
    entries_added: int = 0
    max_deleted_id: str = "0-0"
    groups: tuple[GroupFacts, ...] = ()

    @property
    def head_offset(self) -> int | None:
        """How many entries were ever removed from the head, when Redis' counters tell it.

        None when an entry inside the stream was deleted (XDEL): then entries_added - length
        also counts holes, not only the head.
        """
        if self.first_id is not None and id_key(self.max_deleted_id) >= id_key(self.first_id):
            return None
        return self.entries_added - self.length

    def behind_head(self, group: GroupFacts) -> bool:
        """Whether what `group` would read next has already been removed."""
        last = id_key(group.last_delivered)
        if self.first_id is None:
            return last < id_key(self.last_id)
        return last < id_key(self.first_id)


class NotAStream(Exception):
    """The key exists and holds another type."""

    def __init__(self, key: str, kind: str) -> None:
        super().__init__(f"{key!r} is a Redis {kind}, not a stream")
        self.key = key
        self.kind = kind


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream ID as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def decode_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_facts(key: str, reply: Any) -> StreamFacts:
    """StreamFacts from the reply of `facts()` in LUA_LIBRARY; raises NotAStream."""
    if not isinstance(reply, list) or not reply:
        raise ValueError(f"unexpected stream facts reply for {key!r}: {reply!r}")
    status = int(reply[0])
    if status == 0:
        return StreamFacts(exists=False)
    if status < 0:
        raise NotAStream(key, decode_text(reply[1]))
    _, length, first, last, added, max_deleted, groups = reply
    parsed = []
    for g in groups:
        name, consumers, pending, last_delivered, read, lag, kind, idle = g
        parsed.append(
            GroupFacts(
                name=decode_text(name),
                consumers=int(consumers),
                pending=int(pending),
                last_delivered=decode_text(last_delivered),
                entries_read=None if int(read) < 0 else int(read),
                lag=int(lag),
                lag_kind=LagKind(int(kind)),
                oldest_pending_idle_ms=None if int(idle) < 0 else int(idle),
            )
        )
    first_text = decode_text(first)
    return StreamFacts(
        exists=True,
        length=int(length),
        first_id=first_text or None,
        last_id=decode_text(last),
        entries_added=int(added),
        max_deleted_id=decode_text(max_deleted),
        groups=tuple(parsed),
    )


def observe(client: redis.Redis, key: str, scan: int = LAG_SCAN) -> StreamFacts:
    """One stream's facts (blocking, one round trip). Raises NotAStream, redis errors."""
    script = client.register_script(OBSERVE)
    (reply,) = script(keys=[key], args=[scan])
    return parse_facts(key, reply)

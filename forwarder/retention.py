"""Retention "acked": trim only what every consumer group has acknowledged; maxlen as ceiling.

With `[redis] retention = "acked"` the writer's XADD no longer trims (the daemon passes it no
maxlen); instead the consumer-group monitor (consumers.py) runs `TRIM` on every stream once
per round. One call per stream, atomic, in this order:

1. Floor: per group, the oldest pending entry still in the stream, or the entry after its
   last-delivered ID when nothing is pending; the smallest over the groups. `XTRIM MINID ~
   floor` removes only entries every group has been delivered and acknowledged. On Redis
   8.2+ (detected at connect) the same XTRIM also carries `ACKED`, so Redis itself checks
   every group's pending list again before removing anything.
2. Ceiling: if `maxlen` is set and the stream is still longer, `XTRIM MAXLEN ~ maxlen`
   trims the oldest entries whatever the groups have read: a dead group must not fill
   Redis' memory. Before trimming, each group's undelivered entries are known (its lag), so
   the script returns, per group, exactly how many of the removed entries it had not been
   delivered yet: `forwarder_stream_trimmed_unread_total`.
3. A stream without groups follows `maxlen` (XTRIM MAXLEN ~), or is never trimmed.

The script returns the stream's facts after trimming, so the same call feeds the metrics.

Why not XADD's own options? On 8.2+, `XADD ... ACKED MAXLEN ~ N` would trim on every write,
but it never removes an unacknowledged entry, so it cannot be the ceiling, and it cannot
say which group lost what. See docs/consumers.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from forwarder.config import RedisConfig
from forwarder.streaminfo import LAG_SCAN, LUA_LIBRARY, StreamFacts, decode_text, parse_facts

log = logging.getLogger(__name__)

NATIVE_ACKED_SINCE = (8, 2)  # XTRIM/XADD ... ACKED | KEEPREF | DELREF
# Entries one XTRIM may remove (XTRIM's LIMIT, with ~): bounds the time Redis is blocked,
# and the entries the ceiling step may have to count for a group whose lag Redis overstates.
TRIM_LIMIT = 50_000

# KEYS: the streams. ARGV: maxlen (0: none), native ACKED (1/0), scan (lag), limit.
# Returns per key, in KEYS' order, {acked, ceiling, plain, {group, unread, ...}, facts-after}
# (one call per chunk of streams, as streaminfo.OBSERVE).
# allow-oom: trimming frees memory, which is what a full Redis needs.
TRIM = (
    "#!lua flags=allow-oom\n"
    + LUA_LIBRARY
    + r"""
local maxlen = tonumber(ARGV[1])
local native = ARGV[2] == '1'
local scan = tonumber(ARGV[3])
local limit = ARGV[4]
local function trim(key)
local f = facts(key, scan)
if f[1] ~= 1 then return {0, 0, 0, {}, f} end
local groups = f[7]
local acked, ceiling, plain = 0, 0, 0
local lost = {}
if #groups == 0 then
  if maxlen > 0 and f[2] > maxlen then
    plain = redis.call('XTRIM', key, 'MAXLEN', '~', maxlen, 'LIMIT', limit)
  end
  return {acked, ceiling, plain, lost, facts(key, scan)}
end
-- 1. the floor every group still needs
local floor = nil
for _, g in ipairs(groups) do
  local need = nil
  if g[3] > 0 and f[3] ~= '' then
    local p = redis.call('XPENDING', key, g[1], f[3], '+', 1)
    if #p > 0 then need = p[1][1] end
  end
  if not need then need = nextid(g[4]) end
  if not floor or cmp(need, floor) < 0 then floor = need end
end
if f[2] > 0 and cmp(floor, f[3]) > 0 then
  if native then
    acked = redis.call('XTRIM', key, 'MINID', '~', floor, 'LIMIT', limit, 'ACKED')
  else
    acked = redis.call('XTRIM', key, 'MINID', '~', floor, 'LIMIT', limit)
  end
end
-- 2. the ceiling
if maxlen > 0 and redis.call('XLEN', key) > maxlen then
  if acked > 0 then f = facts(key, scan); groups = f[7] end
  local n = f[2]
  local bound = math.min(n - maxlen, tonumber(limit))
  -- per group: how many of the oldest `bound` entries it has been delivered. An exact lag
  -- tells it; Redis' counter only overstates the lag, so it can prove "all of them"; else
  -- count (bounded by `bound`).
  local read = {}
  for i, g in ipairs(groups) do
    local lag, kind = g[6], g[7]
    if kind == 0 or (kind == 1 and n - lag >= bound) then
      read[i] = n - lag
    else
      read[i] = #redis.call('XRANGE', key, '-', g[4], 'COUNT', bound)
    end
  end
  ceiling = redis.call('XTRIM', key, 'MAXLEN', '~', maxlen, 'LIMIT', limit)
  for i, g in ipairs(groups) do
    local unread = ceiling - math.min(ceiling, read[i])
    if unread > 0 then
      lost[#lost + 1] = g[1]
      lost[#lost + 1] = unread
    end
  end
end
return {acked, ceiling, plain, lost, facts(key, scan)}
end
local out = {}
for i, key in ipairs(KEYS) do out[i] = trim(key) end
return out
"""
)


@dataclass(frozen=True)
class TrimResult:
    """What one TRIM call removed, and the stream afterwards."""

    facts: StreamFacts
    acked: int = 0  # entries every group had acknowledged
    ceiling: int = 0  # entries removed by the maxlen ceiling
    plain: int = 0  # entries of a stream without groups removed by maxlen
    unread: dict[str, int] = field(default_factory=dict)  # {group: undelivered entries removed}


def parse_trim(key: str, reply: Any) -> TrimResult:
    """TrimResult from TRIM's reply; raises NotAStream."""
    acked, ceiling, plain, lost, facts = reply
    unread = {decode_text(lost[i]): int(lost[i + 1]) for i in range(0, len(lost) - 1, 2)}
    return TrimResult(
        facts=parse_facts(key, facts),
        acked=int(acked),
        ceiling=int(ceiling),
        plain=int(plain),
        unread=unread,
    )


def writer_config(config: RedisConfig) -> RedisConfig:
    """The writer's view of [redis]: under "acked" its XADD must not trim (TRIM does)."""
    return replace(config, maxlen=None) if config.retention == "acked" else config


def server_version(info: dict[str, Any]) -> tuple[int, ...]:
    """(major, minor, patch) from INFO server's redis_version; () if absent or unreadable."""
    text = str(info.get("redis_version", ""))
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


class Retention:
    """The "acked" policy: its arguments for TRIM, and whether the server trims natively.

    Thread-safety: used by the monitor thread only; `native` may be read from any thread.
    """

    def __init__(self, maxlen: int | None, scan: int = LAG_SCAN, limit: int = TRIM_LIMIT):
        self.maxlen = maxlen
        self.native = False
        self._scan = scan
        self._limit = limit
        self._detected = False

    def detect(self, client: redis.Redis) -> None:
        """Ask the server once whether it has ACKED trimming (Redis 8.2+); logs the answer."""
        if self._detected:
            return
        try:
            version = server_version(dict(client.info("server")))
        except redis.RedisError as exc:  # e.g. an ACL without +info: trim the portable way
            log.info(
                "retention acked: cannot read the Redis version (%s); trimming without ACKED",
                type(exc).__name__,
            )
            version = ()
        self._detected = True
        self.native = version >= NATIVE_ACKED_SINCE
        shown = ".".join(map(str, version)) or "unknown"
        if self.native:
            log.info(
                "retention acked: Redis %s trims natively (XTRIM ... ACKED); forwarder still "
                "computes the floor and enforces the maxlen ceiling (%s)",
                shown,
                self.maxlen or "none",
            )
        else:
            log.info(
                "retention acked: Redis %s has no ACKED trimming (8.2+); trimming each round "
                "to the oldest entry a consumer group still needs, ceiling maxlen %s",
                shown,
                self.maxlen or "none",
            )

    def reset(self) -> None:
        """Detect again at the next connect (after Redis was unreachable: it may be another)."""
        self._detected = False

    def args(self) -> list[int]:
        return [self.maxlen or 0, 1 if self.native else 0, self._scan, self._limit]

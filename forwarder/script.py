"""The batch script the writer runs in Redis, how its arguments are packed and its reply read.

One EVALSHA of `WRITE_BATCH` writes a batch of spooled entries. It is idempotent: entries
whose offset is at or below the high-water mark were applied by an earlier call and are
skipped, so a batch whose reply was lost can be sent again. The script is sans-I/O from
Python's point of view: `pack` builds its keys and arguments, `parse_reply` reads its answer;
sink.py owns the connection.

The mark's value is the offset, optionally followed by lines "offset error" for entries
Redis refused on their merits: a re-sent batch whose first reply was lost still learns which
of its skipped entries were refused (and must go to the dead-letter stream) rather than
taking them for written.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from forwarder.decode import invalid_reason
from forwarder.frames import Opcode, Oversized
from forwarder.spool import GAP, Batch, Entry, Route

TEXT = int(Opcode.TEXT)  # a plain int: compared once per frame

HWM_TTL_SECONDS = 7 * 24 * 3600

# Entry outcomes in the script's status string, one byte per entry it got to, in order.
WRITTEN = ord("w")  # XADD applied by this call
SKIPPED = ord("s")  # at or below the mark: applied by an earlier call
REFUSED = ord("e")  # XADD refused on the entry's merits (now or by an earlier call)

# KEYS[1]: the high-water mark; KEYS[2..]: one per stream slot.
# ARGV[1]: mark ttl; ARGV[2]: maxlen ('0' = none); ARGV[3]: the batch's last offset;
# ARGV[4]: the batch's first offset (refusal records below it are settled and pruned);
# ARGV[5]: the number of slots S, then S pairs (event, source) for KEYS[2..S+1]. Then per
# entry, either a frame, in 4 arguments (the hot path: few arguments to pack and parse):
#   offset, slot key index k > 1, received_at (ms), data
# or any other entry (dead letters, gap records):
#   offset, -k, trim flag (1/0), field count n, n field/value items.
# Returns {statuses, {offset, error, ...}}: one status byte per entry (w, s, e; see above)
# and the refusals; or {statuses, refusals, offset, error} when it stopped at a
# configuration error (NOPERM, WRONGTYPE): that entry and the rest are left for a later
# retry (the statuses stop before it), the mark says where.
# The `#!lua` line makes Redis 7 refuse the whole script up front under OOM, instead of
# failing half-way.
WRITE_BATCH = """#!lua
local ttl = ARGV[1]
local raw = redis.call('GET', KEYS[1])
local hwm, records = 0, ''
if raw then
  local nl = string.find(raw, '\\n', 1, true)
  if nl then
    hwm = tonumber(string.sub(raw, 1, nl - 1))
    records = string.sub(raw, nl + 1)
  else
    hwm = tonumber(raw)
  end
end
local last = tonumber(ARGV[3])
local floor = tonumber(ARGV[4])
local refused = nil -- offset -> error of earlier refusals, parsed when first needed
local added = ''
local function save(mark)
  -- The mark, then the refusals of entries the spool has not committed yet.
  local keep = {}
  for off, err in string.gmatch(records .. added, '(%d+) ([^\\n]*)\\n') do
    if tonumber(off) >= floor then keep[#keep + 1] = off .. ' ' .. err .. '\\n' end
  end
  local value = tostring(mark)
  if #keep > 0 then value = value .. '\\n' .. table.concat(keep) end
  redis.call('SET', KEYS[1], value, 'EX', ttl)
end
-- Claim the batch first: if this SET is refused, nothing below has run.
if last > hwm then save(last) end
local maxlen = ARGV[2]
local trim = maxlen ~= '0'
local status = {}
local errors = {}
local applied = hwm
local i = 6 + 2 * tonumber(ARGV[5])
while i <= #ARGV do
  local off = tonumber(ARGV[i])
  local k = tonumber(ARGV[i + 1])
  local r = nil
  local nexti
  if k > 0 then
    if off > hwm then
      local s = 2 + 2 * k
      if trim then
        r = redis.pcall('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*', 'data', ARGV[i + 3],
          'event', ARGV[s], 'source', ARGV[s + 1], 'received_at', ARGV[i + 2])
      else
        r = redis.pcall('XADD', KEYS[k], '*', 'data', ARGV[i + 3],
          'event', ARGV[s], 'source', ARGV[s + 1], 'received_at', ARGV[i + 2])
      end
    end
    nexti = i + 4
  else
    local n = tonumber(ARGV[i + 3])
    if off > hwm then
      local cmd = {'XADD', KEYS[-k]}
      if ARGV[i + 2] == '1' and trim then
        cmd[3] = 'MAXLEN'; cmd[4] = '~'; cmd[5] = maxlen
      end
      cmd[#cmd + 1] = '*'
      for j = 1, n do cmd[#cmd + 1] = ARGV[i + 3 + j] end
      r = redis.pcall(unpack(cmd))
    end
    nexti = i + 4 + n
  end
  if r == nil then
    -- Skipped: applied by an earlier call, or refused by it (then say so again).
    if refused == nil then
      refused = {}
      for o, err in string.gmatch(records, '(%d+) ([^\\n]*)\\n') do refused[tonumber(o)] = err end
    end
    local err = refused[off]
    if err then
      status[#status + 1] = 'e'
      errors[#errors + 1] = off
      errors[#errors + 1] = err
    else
      status[#status + 1] = 's'
    end
  elseif type(r) == 'table' and r.err then
    local e = r.err
    -- Redis 7.0 reports an ACL refusal inside a script as "ERR The user executing the
    -- script can't run this command" or "can't access ... keys", not as NOPERM.
    if string.sub(e, 1, 6) == 'NOPERM' or string.sub(e, 1, 9) == 'WRONGTYPE'
        or string.find(e, "can't run", 1, true) or string.find(e, "can't access", 1, true)
        or string.find(e, 'no permissions', 1, true) then
      save(applied)
      return {table.concat(status), errors, off, e}
    end
    e = string.gsub(e, '\\n', ' ')
    status[#status + 1] = 'e'
    errors[#errors + 1] = off
    errors[#errors + 1] = e
    added = added .. off .. ' ' .. e .. '\\n'
    applied = off
  else
    status[#status + 1] = 'w'
    applied = off
  end
  i = nexti
end
if added ~= '' then save(last) end
return {table.concat(status), errors}
"""


@dataclass(frozen=True)
class Reply:
    """What one script call did: a status byte per entry it got to, the refusals, and where
    it stopped at a configuration error (None if it went through the whole batch)."""

    statuses: bytes
    refused: dict[int, str]
    stopped: tuple[int, str] | None


def parse_reply(reply: object) -> Reply:
    """Read WRITE_BATCH's answer (see its comment for the layout)."""
    if not (isinstance(reply, list) and len(reply) in (2, 4) and isinstance(reply[1], list)):
        raise ValueError(f"unexpected reply from the batch script: {reply!r:.200}")
    statuses = reply[0] if isinstance(reply[0], bytes) else str(reply[0]).encode()
    errs = reply[1]
    refused = {int(errs[k]): _text(errs[k + 1]) for k in range(0, len(errs) - 1, 2)}
    stopped = (int(reply[2]), _text(reply[3])) if len(reply) == 4 else None
    return Reply(statuses, refused, stopped)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Packer:
    """Builds the script's keys and arguments for a batch (the writer's per-frame hot path)."""

    def __init__(self, routes: Sequence[Route], maxlen: int | None, gap_stream: str) -> None:
        self._routes = routes  # the spool's list: it grows when a reload adds a route
        self._maxlen = str(maxlen or 0)
        self._gap_stream = gap_stream

    def pack(
        self, hwm_key: str, batch: Batch, rejected: dict[int, str], floor: int
    ) -> tuple[list[str], list[bytes | str | int], dict[int, str]]:
        """Script keys and arguments for a batch (see WRITE_BATCH); also {offset: reason}
        for the entries that go to a dead-letter stream. `rejected`: entries Redis refused
        once, to be dead-lettered with that error. `floor`: the first offset the spool has
        not committed (refusal records below it are settled)."""
        keys: list[str] = [hwm_key]
        slot_args: list[bytes | str | int] = []
        slots: dict[tuple[str, str, str], int] = {}
        entry_args: list[bytes | str | int] = []
        invalid: dict[int, str] = {}
        routes = self._routes
        for offset, entry in batch:
            route_index, opcode, payload, received_at = entry
            if (
                opcode == TEXT
                and type(payload) is bytes
                and offset not in rejected
                and invalid_reason(opcode, payload) is None
            ):
                route = routes[route_index]
                slot = (route.stream, route.event, route.source)
                k = slots.get(slot)
                if k is None:
                    keys.append(route.stream)
                    slot_args += (route.event, route.source)
                    k = slots[slot] = len(keys)
                entry_args += (offset, k, int(received_at * 1000), payload)
                continue
            stream, trim, fields, reason = self._route(entry, rejected.get(offset))
            if reason is not None:
                invalid[offset] = reason
            slot = (stream, "", "")
            k = slots.get(slot)
            if k is None:
                keys.append(stream)
                slot_args += ("", "")
                k = slots[slot] = len(keys)
            entry_args += (offset, -k, trim, len(fields), *fields)
        args: list[bytes | str | int] = [
            HWM_TTL_SECONDS,
            self._maxlen,
            batch[-1][0],
            floor,
            len(keys) - 1,
            *slot_args,
            *entry_args,
        ]
        return keys, args, invalid

    def _route(
        self, entry: Entry, error: str | None
    ) -> tuple[str, str, list[bytes | str | int], str | None]:
        """Where an entry that is not a valid frame goes (valid frames take `pack`'s fast
        path): a gap record to the gap stream; anything else to the dead-letter stream, with
        its reason and, for an entry Redis refused once, the error.

        Returns (stream, trim flag, fields, dead-letter reason or None).
        """
        route = self._routes[entry.subscription]
        if error is None and entry.opcode == GAP:
            return self._gap_stream, "0", gap_fields(route, entry), None
        if error is not None:
            reason = "redis_rejected"
        else:
            # Never None here by construction; "unroutable" keeps the frame all the same.
            reason = invalid_reason(entry.opcode, entry.payload) or "unroutable"
        fields = dead_letter_fields(route, entry, reason, int(entry.received_at * 1000))
        if error is not None:
            fields += ["error", error]
        return route.dead_letter_stream, "0", fields, reason


def dead_letter_fields(
    route: Route, entry: Entry, reason: str, received_ms: int
) -> list[bytes | str | int]:
    """The fields of a dead-letter entry: why, where from, and the raw bytes in base64."""
    payload = entry.payload
    fields: list[bytes | str | int] = [
        "reason",
        reason,
        "event",
        route.event,
        "source",
        route.source,
        "received_at",
        received_ms,
        "opcode",
        int(entry.opcode),  # hiredis packs exact ints only, not IntEnum
    ]
    if isinstance(payload, Oversized):
        fields += [
            "size",
            payload.size,
            "truncated",
            1,
            "sha256",
            payload.sha256,
            "data_base64",
            base64.b64encode(payload.head),
        ]
    else:
        fields += ["size", len(payload), "truncated", 0, "data_base64", base64.b64encode(payload)]
    return fields


def gap_fields(route: Route, entry: Entry) -> list[bytes | str | int]:
    """The fields of a gap record: source, event, then the record's own (start, end, cause…)."""
    fields: list[bytes | str | int] = ["source", route.source, "event", route.event]
    try:
        record = orjson.loads(entry.payload) if isinstance(entry.payload, bytes) else {}
    except orjson.JSONDecodeError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    for key, value in record.items():
        fields += [str(key), value if isinstance(value, int | str) else orjson.dumps(value)]
    return fields

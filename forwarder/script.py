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
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson
from redis.crc import key_slot

from forwarder.decode import invalid_reason
from forwarder.frames import Opcode, Oversized
from forwarder.spool import GAP, Batch, Entry, Route

TEXT = int(Opcode.TEXT)  # a plain int: compared once per frame
_CONTAINERS = (dict, list)  # what a valid frame's JSON is (decode.invalid_reason)

HWM_TTL_SECONDS = 7 * 24 * 3600

# Entry outcomes in the script's status string, one byte per entry it got to, in order.
WRITTEN = ord("w")  # XADD applied by this call
SKIPPED = ord("s")  # at or below the mark: applied by an earlier call
REFUSED = ord("e")  # XADD refused on the entry's merits (now or by an earlier call)

# KEYS[1..S]: the streams of this call; KEYS[S+1..2S]: their marks; KEYS[2S+1]: the
# mark of the previous version (one per spool, read as a floor), if ARGV[4] is '1'.
# ARGV[1]: mark ttl; ARGV[2]: maxlen ('0' = none); ARGV[3]: S; ARGV[4]: legacy flag;
# ARGV[5]: the spool's first uncommitted offset (refusal records below it are settled and
# pruned); ARGV[6..5+S]: per stream, the last offset of this call's entries for it; then
# R, the number of routes, and R triples (stream index, event, source). Then per entry,
# either a frame, in 4 arguments (the hot path: few arguments to pack and parse):
#   offset, route index r > 0, received_at (ms), data
# or any other entry (dead letters, gap records):
#   offset, -s (stream index), trim flag (1/0), field count n, n field/value items.
# Returns {statuses, {offset, error, ...}}: one status byte per entry (w, s, e; see above)
# and the refusals; or {statuses, refusals, offset, error} when it stopped at a
# configuration error (NOPERM, WRONGTYPE): that entry and the rest are left for a later
# retry (the statuses stop before it), the marks say where.
# The `#!lua` line makes Redis 7 refuse the whole script up front under OOM, instead of
# failing half-way.
WRITE_BATCH = """#!lua
local ttl = ARGV[1]
local maxlen = ARGV[2]
local trim = maxlen ~= '0'
local S = tonumber(ARGV[3])
local floor = tonumber(ARGV[5])
local legacy = 0
if ARGV[4] == '1' then legacy = tonumber(redis.call('GET', KEYS[2 * S + 1]) or '0') end
local hwm, last, records, added, applied, refused = {}, {}, {}, {}, {}, {}
for s = 1, S do
  local raw = redis.call('GET', KEYS[S + s])
  local h, r = 0, ''
  if raw then
    local nl = string.find(raw, '\\n', 1, true)
    if nl then
      h = tonumber(string.sub(raw, 1, nl - 1))
      r = string.sub(raw, nl + 1)
    else
      h = tonumber(raw)
    end
  end
  if h < legacy then h = legacy end
  hwm[s] = h
  applied[s] = h
  records[s] = r
  added[s] = ''
  last[s] = math.max(h, tonumber(ARGV[5 + s]))
end
local function save(s, mark)
  -- The mark, then the refusals of entries the spool has not committed yet.
  if records[s] == '' and added[s] == '' then  -- the usual case: no refusals to carry
    redis.call('SET', KEYS[S + s], mark, 'EX', ttl)
    return
  end
  local keep = {}
  for off, err in string.gmatch(records[s] .. added[s], '(%d+) ([^\\n]*)\\n') do
    if tonumber(off) >= floor then keep[#keep + 1] = off .. ' ' .. err .. '\\n' end
  end
  local value = tostring(mark)
  if #keep > 0 then value = value .. '\\n' .. table.concat(keep) end
  redis.call('SET', KEYS[S + s], value, 'EX', ttl)
end
-- Claim the batch first: if a SET is refused, nothing below has run. Marks with nothing
-- new are written too, so that a WAIT after a re-sent batch waits for what the first send
-- wrote (WAIT counts the writes of its own connection).
for s = 1, S do save(s, last[s]) end
local base = 6 + S
local R = tonumber(ARGV[base])
local route = {}
for r = 1, R do route[r] = tonumber(ARGV[base + 3 * r - 2]) end
local status = {}
local errors = {}
local i = base + 3 * R + 1
while i <= #ARGV do
  local off = tonumber(ARGV[i])
  local k = tonumber(ARGV[i + 1])
  local s
  local r = nil
  local nexti
  if k > 0 then
    s = route[k]
    if off > hwm[s] then
      local a = base + 3 * k
      if trim then
        r = redis.pcall('XADD', KEYS[s], 'MAXLEN', '~', maxlen, '*', 'data', ARGV[i + 3],
          'event', ARGV[a - 1], 'source', ARGV[a], 'received_at', ARGV[i + 2])
      else
        r = redis.pcall('XADD', KEYS[s], '*', 'data', ARGV[i + 3],
          'event', ARGV[a - 1], 'source', ARGV[a], 'received_at', ARGV[i + 2])
      end
    end
    nexti = i + 4
  else
    s = -k
    local n = tonumber(ARGV[i + 3])
    if off > hwm[s] then
      local cmd = {'XADD', KEYS[s]}
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
    if refused[s] == nil then
      local t = {}
      for o, err in string.gmatch(records[s], '(%d+) ([^\\n]*)\\n') do t[tonumber(o)] = err end
      refused[s] = t
    end
    local err = refused[s][off]
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
      for t = 1, S do save(t, applied[t]) end
      return {table.concat(status), errors, off, e}
    end
    e = string.gsub(e, '\\n', ' ')
    status[#status + 1] = 'e'
    errors[#errors + 1] = off
    errors[#errors + 1] = e
    added[s] = added[s] .. off .. ' ' .. e .. '\\n'
    applied[s] = off
  else
    status[#status + 1] = 'w'
    applied[s] = off
  end
  i = nexti
end
for s = 1, S do
  if added[s] ~= '' then save(s, last[s]) end
end
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


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of a key: the text inside its first {...} when that is not
    empty, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def slot(key: str) -> int:
    """The key's Redis Cluster hash slot (0..16383)."""
    return int(key_slot(key.encode()))


@functools.cache
def _tag_for_slot(target: int) -> str:
    """A short hash tag of the given slot, for a stream whose own name cannot serve as one."""
    for i in range(1 << 20):  # bounded; every slot is reached well before (about 16k tries)
        if slot(str(i)) == target:
            return str(i)
    raise AssertionError(f"no tag found for slot {target}")


@functools.cache
def mark_key(stream: str, writer_id: str, suffix: str = "") -> str:
    """The high-water-mark key of `stream` for the spool `writer_id`, in the stream's hash
    slot: forwarder:hwm:{<stream>}:<id> for a stream without a hash tag, else
    forwarder:hwm:{<tag>}:<id>:<stream> (several streams may share a tag)."""
    tag = hash_tag(stream)
    if "}" in tag:  # e.g. "a}b": no {...} of ours could hash like it; borrow a short tag
        tag = _tag_for_slot(slot(stream))
    key = f"forwarder:hwm:{{{tag}}}:{writer_id}{suffix}"
    return key if tag == stream else f"{key}:{stream}"


def legacy_mark_key(writer_id: str, suffix: str = "") -> str:
    """The previous version's one mark per spool: a floor for entries it wrote."""
    return f"forwarder:hwm:{writer_id}{suffix}"


class Call(NamedTuple):
    """One script call: its keys, arguments, and the entries' dead-letter reasons."""

    keys: list[str]
    args: list[bytes | str | int]
    invalid: dict[int, str]


class Packer:
    """Builds the script's keys and arguments for a batch (the writer's per-frame hot path).

    `cluster`: every call must stay within one hash slot (`groups` splits a batch so), and
    the previous version's per-spool mark is not read (it never ran on a cluster).
    """

    def __init__(
        self,
        routes: Sequence[Route],
        maxlen: int | None,
        gap_stream: str,
        writer_id: str,
        cluster: bool = False,
    ) -> None:
        self._routes = routes  # the spool's list: it grows when a reload adds a route
        self._maxlen = str(maxlen or 0)
        self._gap_stream = gap_stream
        self._writer_id = writer_id
        self._cluster = cluster
        # suffix -> stream -> its mark key (mark_key's own cache costs a call per stream).
        self._marks: dict[str, dict[str, str]] = {}

    def destination(self, offset: int, entry: Entry, rejected: dict[int, str]) -> str:
        """The stream an entry goes to."""
        if self._valid_frame(offset, entry, rejected):
            return self._routes[entry.subscription].stream
        return self._route(entry, rejected.get(offset))[0]

    def groups(self, batch: Batch, rejected: dict[int, str]) -> list[Batch]:
        """The batch split into one part per hash slot on a cluster (offsets stay
        increasing within each part); the whole batch otherwise."""
        if not self._cluster:
            return [batch]
        parts: dict[int, Batch] = {}
        for offset, entry in batch:
            key = slot(self.destination(offset, entry, rejected))
            parts.setdefault(key, []).append((offset, entry))
        return list(parts.values())

    def _valid_frame(self, offset: int, entry: Entry, rejected: dict[int, str]) -> bool:
        opcode, payload = entry.opcode, entry.payload
        return (
            opcode == TEXT
            and type(payload) is bytes
            and offset not in rejected
            and invalid_reason(opcode, payload) is None
        )

    def pack(self, batch: Batch, rejected: dict[int, str], floor: int, suffix: str = "") -> Call:
        """The script call for a batch (see WRITE_BATCH) whose streams share a slot on a
        cluster. `rejected`: entries Redis refused once, to be dead-lettered with that error.
        `floor`: the spool's first uncommitted offset. `suffix`: the marks' namespace (the
        dead-letter pass for refused entries keeps its own)."""
        streams: dict[str, int] = {}
        last: list[int] = []
        route_args: list[bytes | str | int] = []
        route_ids: dict[int, int] = {}  # the spool's route index -> the call's route r
        route_stream: dict[int, int] = {}  # the call's route r -> its stream index s
        entry_args: list[bytes | str | int] = []
        invalid: dict[int, str] = {}
        routes = self._routes
        loads = orjson.loads
        for offset, entry in batch:
            route_index, opcode, payload, received_at = entry
            # invalid_reason's verdict, inlined for the usual frame (a text frame holding a
            # JSON object or array): one call less per frame. Anything else asks it.
            if opcode == TEXT and type(payload) is bytes and offset not in rejected:
                try:
                    valid = type(loads(payload)) in _CONTAINERS
                except (orjson.JSONDecodeError, RecursionError, MemoryError):
                    valid = False
                if valid or invalid_reason(opcode, payload) is None:
                    r = route_ids.get(route_index)
                    if r is None:
                        route = routes[route_index]
                        s = streams.get(route.stream)
                        if s is None:
                            s = streams[route.stream] = len(streams) + 1
                            last.append(0)
                        route_args += (s, route.event, route.source)
                        r = route_ids[route_index] = len(route_ids) + 1
                        route_stream[r] = s
                    last[route_stream[r] - 1] = offset
                    entry_args += (offset, r, int(received_at * 1000), payload)
                    continue
            stream, trim, fields, reason = self._route(entry, rejected.get(offset))
            if reason is not None:
                invalid[offset] = reason
            s = streams.get(stream)
            if s is None:
                s = streams[stream] = len(streams) + 1
                last.append(0)
            last[s - 1] = offset
            entry_args += (offset, -s, trim, len(fields), *fields)
        names = list(streams)
        marks = self._marks.get(suffix)
        if marks is None:
            marks = self._marks[suffix] = {}
        keys = names.copy()
        for name in names:
            mark = marks.get(name)
            if mark is None:
                mark = marks[name] = mark_key(name, self._writer_id, suffix)
            keys.append(mark)
        legacy = not self._cluster
        if legacy:
            keys.append(legacy_mark_key(self._writer_id, suffix))
        args: list[bytes | str | int] = [
            HWM_TTL_SECONDS,
            self._maxlen,
            len(names),
            "1" if legacy else "0",
            floor,
            *last,
            len(route_ids),
            *route_args,
            *entry_args,
        ]
        return Call(keys, args, invalid)

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

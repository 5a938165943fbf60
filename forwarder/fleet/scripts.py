"""The Lua scripts behind leases, membership and handover (one atomic step each).

Every script reads the server's clock (TIME) rather than trusting the members' clocks, and
keeps the group's epoch: the server time at which this Redis first saw the group. A missing
epoch means Redis lost the fleet's state (a restart without persistence, FLUSHALL); the
script then starts a new epoch, and for one lease_ttl ("quiet") nobody may acquire a free
lease: a holder whose lease vanished with the restart still runs it until its own deadline,
and re-asserts it at its next renewal instead. See docs/fleet.md, "When Redis fails".

Key layout: keys.py. Replies are flat arrays; store.py decodes them.
"""

from __future__ import annotations

# Shared helpers, prepended to every script.
_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The group's epoch; created (as "now") when Redis has none.
local function epoch(key, now)
  local e = redis.call('GET', key)
  if not e then
    e = tostring(now)
    redis.call('SET', key, e)
  end
  return tonumber(e)
end

local function decode(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then return value end
  return nil
end

-- "FENCE NAME INCARNATION" -> fence, name, incarnation
local function split_token(token)
  return string.match(token or '', '^(%d+) (%S+) (%S+)$')
end

-- The last acquirer of SUB, with the server time of its last heartbeat: JSON or false.
local function previous(holders, members, sub)
  local h = decode(redis.call('HGET', holders, sub))
  if not h then return false end
  local _, name = split_token(h['token'])
  if name then
    local beat = redis.call('ZSCORE', members, name)
    if beat then h['beat'] = tonumber(beat) end
  end
  return cjson.encode(h)
end

local function hold(holders, sub, token, now, via)
  local record = {token = token, state = 'held', at = now, via = via}
  redis.call('HSET', holders, sub, cjson.encode(record))
end
"""

# KEYS: epoch, members, member key, drain
# ARGV: name, incarnation, record JSON, ttl ms, forget ms
# Reply: {now, epoch, conflicting record or false, drain asked (0/1), {name, score, ...}}
HEARTBEAT = (
    _PRELUDE
    + r"""
local now = now_ms()
local ep = epoch(KEYS[1], now)
local conflict = false
local current = decode(redis.call('GET', KEYS[3]))
if current and current['incarnation'] ~= ARGV[2] then
  conflict = redis.call('GET', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  redis.call('ZADD', KEYS[2], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
local drain = redis.call('HEXISTS', KEYS[4], ARGV[1])
return {now, ep, conflict, drain, redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""
)

# KEYS: epoch, fences, holders, members, then per item: lease, handover
# ARGV: ttl ms, quiet ms, then per item: sub, token, role ('o' owner, 's' successor)
# Reply per item: status, handover JSON or false, current holder or false, previous or false
RENEW = (
    _PRELUDE
    + r"""
local now = now_ms()
local fresh = (now - epoch(KEYS[1], now)) < tonumber(ARGV[2])
local ttl = ARGV[1]
local out = {}
for i = 0, (#ARGV - 2) / 3 - 1 do
  local lease, ho = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  local sub, token, role = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  local cur = redis.call('GET', lease)
  local status, marker, holder, prev = 'lost', false, cur or false, false
  if cur == token then
    redis.call('PEXPIRE', lease, ttl)
    status = (role == 's') and 'promoted' or 'held'
    marker = redis.call('GET', ho)
  elseif not cur then
    if role == 'o' and fresh then
      -- Redis lost it with its state: ours again, and fencing numbers stay increasing.
      redis.call('SET', lease, token, 'PX', ttl)
      local fence = tonumber((split_token(token)))
      if fence and fence > tonumber(redis.call('HGET', KEYS[2], sub) or '0') then
        redis.call('HSET', KEYS[2], sub, fence)
      end
      hold(KEYS[3], sub, token, now, 'reassert')
      status = 'reasserted'
    elseif role == 's' then
      -- The holder's lease ran out during the handover: the successor takes it.
      local h = decode(redis.call('GET', ho))
      if h and h['successor'] == token then
        prev = previous(KEYS[3], KEYS[4], sub)
        redis.call('SET', lease, token, 'PX', ttl)
        hold(KEYS[3], sub, token, now, 'promoted')
        redis.call('DEL', ho)
        status = 'promoted'
      end
    end
  elseif role == 's' then
    local h = decode(redis.call('GET', ho))
    if h and h['successor'] == token and h['from'] == cur then
      redis.call('PEXPIRE', ho, ttl)
      status = 'successor'
      marker = redis.call('GET', ho)
    end
  end
  out[#out + 1] = status
  out[#out + 1] = marker
  out[#out + 1] = (status == 'lost') and holder or false
  out[#out + 1] = prev
end
return out
"""
)

# KEYS: epoch, fences, holders, members, then per item: lease, handover
# ARGV: name, incarnation, ttl ms, quiet ms, then per item: sub
# Reply per item: status, token or false, holder or false, previous or false
ACQUIRE = (
    _PRELUDE
    + r"""
local now = now_ms()
local fresh = (now - epoch(KEYS[1], now)) < tonumber(ARGV[4])
local name, inc, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 0, #ARGV - 5 do
  local lease, ho = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  local sub = ARGV[5 + i]
  local cur = redis.call('GET', lease)
  local status, token, holder, prev = 'held', false, cur or false, false
  local _, cur_name, cur_inc = split_token(cur)
  if not cur then
    holder = false
    if fresh then
      status = 'quiet'
    else
      token = redis.call('HINCRBY', KEYS[2], sub, 1) .. ' ' .. name .. ' ' .. inc
      if redis.call('SET', lease, token, 'NX', 'PX', ttl) then
        prev = previous(KEYS[3], KEYS[4], sub)
        hold(KEYS[3], sub, token, now, 'acquired')
        redis.call('DEL', ho) -- a move left behind by an expired holder
        status = 'acquired'
      end
    end
  elseif cur_name == name and cur_inc == inc then
    -- Ours already: an earlier reply was lost on the way. Extend it from now.
    redis.call('PEXPIRE', lease, ttl)
    status, token, holder = 'acquired', cur, false
  else
    local h = decode(redis.call('GET', ho))
    if h and h['to'] == name and h['from'] == cur then
      local _, s_name, s_inc = split_token(h['successor'])
      if s_name == name and s_inc == inc then
        redis.call('PEXPIRE', ho, ttl) -- our claim; its reply was lost
        status, token = 'claimed', h['successor']
      elseif h['state'] == 'requested' then
        token = redis.call('HINCRBY', KEYS[2], sub, 1) .. ' ' .. name .. ' ' .. inc
        h['state'] = 'claimed'
        h['successor'] = token
        redis.call('SET', ho, cjson.encode(h), 'PX', ttl)
        status = 'claimed'
      end
    end
  end
  out[#out + 1] = status
  out[#out + 1] = token
  out[#out + 1] = holder
  out[#out + 1] = prev
end
return out
"""
)

# KEYS: per item: lease, handover
# ARGV: timeout ms, then per item: token, target
# Reply per item: 'requested' | the state of our existing request | 'lost'
REQUEST_HANDOVER = (
    _PRELUDE
    + r"""
local now = now_ms()
local out = {}
for i = 0, (#ARGV - 1) / 2 - 1 do
  local lease, ho = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local token, target = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local status = 'lost'
  if redis.call('GET', lease) == token then
    local h = decode(redis.call('GET', ho))
    if h and h['from'] == token and (h['state'] ~= 'requested' or h['to'] == target) then
      status = h['state']
    else
      local marker = cjson.encode({from = token, to = target, state = 'requested', at = now})
      redis.call('SET', ho, marker, 'PX', ARGV[1])
      status = 'requested'
    end
  end
  out[#out + 1] = status
end
return out
"""
)

# KEYS: per item: handover;  ARGV: per item: successor token
# Reply per item: 1 (marked connected) or 0 (no such claim)
REPORT_CONNECTED = (
    _PRELUDE
    + r"""
local out = {}
for i = 1, #KEYS do
  local h = decode(redis.call('GET', KEYS[i]))
  if h and h['successor'] == ARGV[i] then
    h['state'] = 'connected'
    redis.call('SET', KEYS[i], cjson.encode(h), 'KEEPTTL')
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: holders, then per item: lease, handover
# ARGV: ttl ms, then per item: sub, token
# Reply per item: 'handed' (to the connected successor) | 'released' | 'lost'
RELEASE = (
    _PRELUDE
    + r"""
local now = now_ms()
local out = {}
for i = 0, (#ARGV - 1) / 2 - 1 do
  local lease, ho = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local sub, token = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local status = 'lost'
  if redis.call('GET', lease) == token then
    local h = decode(redis.call('GET', ho))
    if h and h['from'] == token and h['state'] == 'connected' and h['successor'] then
      redis.call('SET', lease, h['successor'], 'PX', ARGV[1])
      hold(KEYS[1], sub, h['successor'], now, 'handover')
      redis.call('DEL', ho)
      status = 'handed'
    else
      redis.call('DEL', lease)
      if h and h['from'] == token then redis.call('DEL', ho) end
      redis.call('HSET', KEYS[1], sub,
        cjson.encode({token = token, state = 'released', at = now}))
      status = 'released'
    end
  end
  out[#out + 1] = status
end
return out
"""
)

# KEYS: per item: handover;  ARGV: per item: our (holder) token
# Reply per item: 'cancelled' | 'connected' (too late: the successor is up, the move goes
# on) | 'gone' (no move of ours)
CANCEL_HANDOVER = (
    _PRELUDE
    + r"""
local out = {}
for i = 1, #KEYS do
  local h = decode(redis.call('GET', KEYS[i]))
  if h and h['from'] == ARGV[i] then
    if h['state'] == 'connected' then
      out[i] = 'connected'
    else
      redis.call('DEL', KEYS[i])
      out[i] = 'cancelled'
    end
  else
    out[i] = 'gone'
  end
end
return out
"""
)

# KEYS: members, member key, drain;  ARGV: name, incarnation
# Removes the member (unless another live process holds the name) and its drain request.
LEAVE = (
    _PRELUDE
    + r"""
local current = decode(redis.call('GET', KEYS[2]))
if current and current['incarnation'] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
)

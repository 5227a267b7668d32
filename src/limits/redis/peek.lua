-- What remains for one entity (GET /v1/limits, SPEC §13), read without consuming anything: the
-- keys of decide.lua, read only, on the server's clock. KEYS[1..2] and ARGV[1..2] as there;
-- KEYS[3] the token state and KEYS[4] the concurrency leases, with ARGV[3] tokens per minute
-- and ARGV[4] daily tokens (0 = none), when the tier has those limits.
--
-- Returns {requests admissible now (-1 = no GCRA), microseconds until the bucket is full,
--          requests used today, microseconds until 00:00 UTC,
--          whole tokens in the bucket (negative: debt), ms until it is full, tokens used today,
--          requests in flight}

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local day_us = 86400000000
local day = math.floor(now / day_us)
local until_midnight = (day + 1) * day_us - now
local now_ms = math.floor(now / 1000)

local remaining = -1
local ahead = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then
    tat = now
  end
  ahead = tat - now
  -- As decide.lua admits: while the new arrival time is at most `burst` intervals ahead.
  remaining = math.floor((burst * interval - ahead) / interval)
  if remaining < 0 then
    remaining = 0
  elseif remaining > burst then
    remaining = burst
  end
end

local used = 0
local d = redis.call('HMGET', KEYS[2], 'day', 'used')
if tonumber(d[1]) == day then
  used = tonumber(d[2]) or 0
end

local whole, to_full, used_tokens, in_flight = 0, 0, 0, 0
if KEYS[3] then
  local tpm = tonumber(ARGV[3])
  local UNIT = 60000
  local s = redis.call('HMGET', KEYS[3], 'bal', 'at', 'day', 'used')
  local bal = tonumber(s[1]) or tpm * UNIT
  local at = tonumber(s[2])
  if tonumber(s[3]) == day then
    used_tokens = tonumber(s[4]) or 0
  end
  if tpm > 0 then
    if at and now_ms > at then
      bal = math.min(bal + (now_ms - at) * tpm, tpm * UNIT)
    end
    to_full = math.max(0, math.ceil((tpm * UNIT - bal) / tpm))
  end
  whole = math.floor(bal / UNIT)
  -- Leases past their expiry are not counted (the next decision sweeps them).
  in_flight = redis.call('ZCOUNT', KEYS[4], '(' .. now_ms, '+inf')
end
return {remaining, math.floor(ahead), used, until_midnight, whole, to_full, used_tokens, in_flight}

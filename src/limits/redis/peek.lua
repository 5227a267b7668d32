-- What remains for one entity (GET /v1/limits, SPEC §13), read without consuming anything: the
-- two request keys of decide.lua, read only, on the server's clock. Same KEYS and ARGV[1..2] as there.
--
-- Returns {requests admissible now (-1 = no GCRA), microseconds until the bucket is full,
--          requests used today, microseconds until 00:00 UTC}

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local day_us = 86400000000
local day = math.floor(now / day_us)
local until_midnight = (day + 1) * day_us - now

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
return {remaining, math.floor(ahead), used, until_midnight}

-- One rate-limit decision for the whole fleet (SPEC §4, §11), atomic on the Redis server and
-- on its clock: the per-second GCRA and the daily budget of one entity (organisation or key)
-- under one tier or override. A request refused by either limit consumes nothing from the
-- other.
--
-- KEYS[1]  the GCRA's theoretical arrival time (microseconds), expiring when the bucket is full
-- KEYS[2]  the daily budget: a hash {day, used}, expiring two days after its last write
--          (both keys carry the entity's hash tag, so they live in one Redis Cluster slot)
-- ARGV[1]  emission interval in microseconds (1e6 / requests_per_second), 0 = no GCRA
-- ARGV[2]  burst
-- ARGV[3]  daily budget, 0 = none
-- ARGV[4]  "now" in microseconds since the epoch, or "" for the server's clock (tests only)
--
-- Returns {admitted (1/0), refused by (0 none, 1 requests_per_second, 2 daily_requests),
--          wait in microseconds, burst remaining, daily remaining (-1 = none),
--          microseconds until 00:00 UTC}

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local now
if ARGV[4] ~= "" then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local day_us = 86400000000
local day = math.floor(now / day_us)
local until_midnight = (day + 1) * day_us - now

-- The daily budget: what was used today (a counter of an older day counts nothing).
local used = 0
if budget > 0 then
  local d = redis.call('HMGET', KEYS[2], 'day', 'used')
  if tonumber(d[1]) == day then
    used = tonumber(d[2]) or 0
  end
  if used >= budget then
    return {0, 2, until_midnight, -1, 0, until_midnight}
  end
end

-- The GCRA: admitted while the new arrival time is at most `burst` intervals ahead of now.
local remaining = -1
local new_tat = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then
    tat = now
  end
  new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    local left = -1
    if budget > 0 then
      left = budget - used
    end
    return {0, 1, allow_at - now, 0, left, until_midnight}
  end
  remaining = math.floor((now + burst * interval - new_tat) / interval)
end

-- Admitted: only now is anything consumed.
if interval > 0 then
  -- Gone once the bucket is full again: an idle entity costs nothing.
  redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
end
local left = -1
if budget > 0 then
  redis.call('HSET', KEYS[2], 'day', day, 'used', used + 1)
  redis.call('PEXPIRE', KEYS[2], 2 * 86400000)
  left = budget - used - 1
end
return {1, 0, 0, remaining, left, until_midnight}

-- One rate-limit decision for the whole fleet (SPEC §4, §11, §12), atomic on the Redis server
-- and on its clock: the per-second GCRA and the daily budget of one entity (organisation or
-- key) under one tier or override, and — when the tier has them — a concurrency slot and a
-- token reservation. All or nothing: every limit is checked before anything is written, so a
-- request refused by one limit consumes nothing from the others.
--
-- KEYS[1]  the GCRA's theoretical arrival time (microseconds), expiring when the bucket is full
-- KEYS[2]  the daily budget: a hash {day, used}, expiring two days after its last write
-- KEYS[3]  (optional) the token state: a hash {bal, at, day, used} — `bal` in 1/60000 token
--          at `at` (ms), `used` tokens on UTC day `day`; expiring once it is that of a fresh
--          entity (bucket full, and the day over when a daily budget counts)
-- KEYS[4]  (optional) the concurrency slots: a sorted set of leases scored by their expiry (ms)
--          (all keys carry the entity's hash tag, so they live in one Redis Cluster slot)
-- ARGV[1]  emission interval in microseconds (1e6 / requests_per_second), 0 = no GCRA
-- ARGV[2]  burst
-- ARGV[3]  daily budget, 0 = none
-- ARGV[4]  "now" in microseconds since the epoch, or "" for the server's clock (tests only)
-- ARGV[5]  requests to take: 1, or more for a debited lease (the replica admits the others
--          itself within a few ms): as many as the bucket holds are taken, up to this, and
--          of the daily budget at most what is left shared by twice the replicas (so that
--          its last requests go one at a time)
-- ARGV[6]  live replicas (the daily share above)
-- ARGV[7]  tokens per minute, 0 = none              (ARGV[7..12] only with KEYS[3..4])
-- ARGV[8]  daily tokens, 0 = none
-- ARGV[9]  tokens to reserve (already clamped to the limits), -1 = none
-- ARGV[10] concurrent requests allowed, 0 = none
-- ARGV[11] this request's lease (unique in the fleet)
-- ARGV[12] lease lifetime in ms (renewed by the replica while the request runs)
--
-- Returns, as one string of eleven integers separated by spaces (one bulk reply: the client
-- parses it in a fraction of what an array of eleven integers costs it),
--         {admitted (1/0), refused by (0 none, 1 requests_per_second, 2 daily_requests,
--          3 tokens_per_minute, 4 daily_tokens, 5 concurrent_requests),
--          wait in microseconds, burst remaining, daily remaining (-1 = none),
--          microseconds until 00:00 UTC,
--          whole tokens in the bucket (negative: debt), ms until the bucket is full, tokens
--          used today, requests in flight, requests taken (0 when refused)}
-- (the last four 0 when not read: the request reserves no tokens, the tier has no such limit,
-- or a refusal came first; the caller knows which).

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
local now_ms = math.floor(now / 1000)
local until_midnight_ms = math.ceil(until_midnight / 1000)

local take = math.max(1, tonumber(ARGV[5]))
local replicas = math.max(1, tonumber(ARGV[6]))
local tpm, dtok, amount, max_conc, lease, lease_ms = 0, 0, -1, 0, '', 0
if KEYS[3] then
  tpm = tonumber(ARGV[7])
  dtok = tonumber(ARGV[8])
  amount = tonumber(ARGV[9])
  max_conc = tonumber(ARGV[10])
  lease = ARGV[11]
  lease_ms = tonumber(ARGV[12])
end
local UNIT = 60000
local bal, used_tokens, to_full, in_flight = 0, 0, 0, 0

local function reply(...)
  return string.format('%d %d %d %d %d %d %d %d %d %d %d', ...)
end

local function refused(by, wait, burst_left, daily_left)
  return reply(0, by, wait, burst_left, daily_left, until_midnight, math.floor(bal / UNIT), to_full, used_tokens,
    in_flight, 0)
end

-- 1. A concurrency slot: leases that were not renewed in time are gone (their replica died).
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms)
  in_flight = redis.call('ZCARD', KEYS[4])
  if in_flight >= max_conc then
    return refused(5, 1000000, -1, -1)
  end
end

-- 2. Tokens: the daily budget, then the bucket (refilled continuously, possibly in debt).
local counts_tokens = amount >= 0 and (tpm > 0 or dtok > 0)
local tok_day = day
if counts_tokens then
  local s = redis.call('HMGET', KEYS[3], 'bal', 'at', 'day', 'used')
  local at = tonumber(s[2])
  bal = tonumber(s[1]) or tpm * UNIT
  tok_day = tonumber(s[3]) or day
  used_tokens = tonumber(s[4]) or 0
  if tok_day ~= day then
    tok_day = day
    used_tokens = 0
  end
  if tpm > 0 then
    if at and now_ms > at then
      bal = math.min(bal + (now_ms - at) * tpm, tpm * UNIT)
    end
    to_full = math.max(0, math.ceil((tpm * UNIT - bal) / tpm))
  end
  if dtok > 0 and used_tokens + amount > dtok then
    return refused(4, until_midnight, -1, -1)
  end
  if tpm > 0 then
    local missing = amount * UNIT - bal
    if missing > 0 then
      return refused(3, math.max(1, math.ceil(missing / tpm)) * 1000, -1, -1)
    end
  end
end

-- 3. The daily request budget: what was used today (a counter of an older day counts nothing).
local used = 0
if budget > 0 then
  local d = redis.call('HMGET', KEYS[2], 'day', 'used')
  if tonumber(d[1]) == day then
    used = tonumber(d[2]) or 0
  end
  if used >= budget then
    return refused(2, until_midnight, -1, 0)
  end
  take = math.min(take, math.max(1, math.floor((budget - used) / (2 * replicas))))
end

-- 4. The GCRA: admitted while the new arrival time is at most `burst` intervals ahead of now;
-- a debit takes as many more as fit.
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
    return refused(1, allow_at - now, 0, left)
  end
  if take > 1 then
    take = math.max(1, math.min(take, math.floor((now + burst * interval - tat) / interval)))
    new_tat = tat + take * interval
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
  redis.call('HSET', KEYS[2], 'day', day, 'used', used + take)
  redis.call('PEXPIRE', KEYS[2], 2 * 86400000)
  left = budget - used - take
end
if max_conc > 0 then
  redis.call('ZADD', KEYS[4], now_ms + lease_ms, lease)
  -- The set lives as long as its longest lease (replicas may be configured differently).
  if redis.call('PTTL', KEYS[4]) < lease_ms then
    redis.call('PEXPIRE', KEYS[4], lease_ms)
  end
  in_flight = in_flight + 1
end
if counts_tokens then
  if tpm > 0 then
    bal = bal - amount * UNIT
    to_full = math.ceil((tpm * UNIT - bal) / tpm)
  end
  used_tokens = used_tokens + amount
  local keep = math.max(1, to_full)
  if dtok > 0 and used_tokens > 0 then
    keep = math.max(keep, until_midnight_ms)
  end
  redis.call('HSET', KEYS[3], 'bal', bal, 'at', now_ms, 'day', tok_day, 'used', used_tokens)
  redis.call('PEXPIRE', KEYS[3], keep)
end
return reply(1, 0, 0, remaining, left, until_midnight, math.floor(bal / UNIT), to_full, used_tokens, in_flight,
  take)

-- The end of a request that held something in the fleet (SPEC §12): its concurrency lease is
-- released and its token reservation replaced by the usage reported (more or fewer; the bucket
-- may go into debt). The same arithmetic as `limits/tokens.rs` `settle`, on the server's clock.
--
-- KEYS[1]  the token state of decide.lua (KEYS[3] there)
-- KEYS[2]  the concurrency leases of decide.lua (KEYS[4] there)
-- ARGV[1]  tokens per minute, 0 = none
-- ARGV[2]  daily tokens, 0 = none
-- ARGV[3]  tokens reserved, -1 = none (only the lease is released)
-- ARGV[4]  the UTC day number of the reservation
-- ARGV[5]  tokens used
-- ARGV[6]  the lease to release, "" = none
-- ARGV[7]  "now" in microseconds since the epoch, or "" for the server's clock (tests only)
--
-- Returns {whole tokens in the bucket after (negative: debt), tokens used today}
--
-- The clock, day and refill lines repeat decide.lua's on purpose: a script run by EVALSHA
-- cannot call another's code (Redis 7 functions could, but would need FUNCTION LOAD on every
-- server and Redis 7 at least); keep the two in step.

local tpm = tonumber(ARGV[1])
local dtok = tonumber(ARGV[2])
local reserved = tonumber(ARGV[3])
local reserved_day = tonumber(ARGV[4])
local used = tonumber(ARGV[5])
if ARGV[6] ~= "" then
  redis.call('ZREM', KEYS[2], ARGV[6])
end
if reserved < 0 or (tpm == 0 and dtok == 0) then
  return {0, 0}
end
local now
if ARGV[7] ~= "" then
  now = tonumber(ARGV[7])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local day_us = 86400000000
local day = math.floor(now / day_us)
local now_ms = math.floor(now / 1000)
local until_midnight_ms = math.ceil(((day + 1) * day_us - now) / 1000)
local UNIT = 60000

-- Gone means fresh: the bucket refilled completely and nothing counts today.
local s = redis.call('HMGET', KEYS[1], 'bal', 'at', 'day', 'used')
local at = tonumber(s[2])
local bal = tonumber(s[1]) or tpm * UNIT
local tok_day = tonumber(s[3]) or day
local used_today = tonumber(s[4]) or 0
if tok_day ~= day then
  tok_day = day
  used_today = 0
end
local to_full = 0
if tpm > 0 then
  if at and now_ms > at then
    bal = math.min(bal + (now_ms - at) * tpm, tpm * UNIT)
  end
  bal = math.min(bal + (reserved - used) * UNIT, tpm * UNIT)
  to_full = math.ceil((tpm * UNIT - bal) / tpm)
end
if tok_day == reserved_day then
  used_today = math.max(0, used_today + used - reserved)
else
  -- Reserved yesterday: today's budget is charged only what went beyond the reservation.
  used_today = used_today + math.max(0, used - reserved)
end
local keep = math.max(1, to_full)
if dtok > 0 and used_today > 0 then
  keep = math.max(keep, until_midnight_ms)
end
redis.call('HSET', KEYS[1], 'bal', bal, 'at', now_ms, 'day', tok_day, 'used', used_today)
redis.call('PEXPIRE', KEYS[1], keep)
return {math.floor(bal / UNIT), used_today}

-- Gives back what a debited lease took and its replica did not admit in time (decide.lua's
-- ARGV[5]): the GCRA's arrival time moves back that many intervals (never before now: a
-- bucket that refilled meanwhile is full, not fuller), and the daily budget counts them no
-- more if it is still the day they were taken on.
--
-- KEYS[1]  the GCRA's theoretical arrival time (microseconds)
-- KEYS[2]  the daily budget: a hash {day, used}
-- ARGV[1]  emission interval in microseconds, 0 = no GCRA
-- ARGV[2]  requests to give back
-- ARGV[3]  the UTC day they were taken on (days since the epoch)
-- ARGV[4]  "now" in microseconds since the epoch, or "" for the server's clock (tests only)
--
-- Returns the requests given back to the daily budget.

local interval = tonumber(ARGV[1])
local cells = tonumber(ARGV[2])
local now
if ARGV[4] ~= "" then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if tat and tat > now then
    local back = math.max(now, tat - cells * interval)
    if back > now then
      redis.call('SET', KEYS[1], back, 'PX', math.max(1, math.ceil((back - now) / 1000)))
    else
      redis.call('DEL', KEYS[1])
    end
  end
end

local d = redis.call('HMGET', KEYS[2], 'day', 'used')
if tonumber(d[1]) == tonumber(ARGV[3]) and tonumber(d[2]) then
  local back = math.min(cells, tonumber(d[2]))
  redis.call('HSET', KEYS[2], 'used', tonumber(d[2]) - back)
  return back
end
return 0

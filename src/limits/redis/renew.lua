-- Keeps the leases of requests still running (SPEC §12): each gets a new expiry `ARGV[1]` ms
-- from the server's now. A lease already gone (released, or expired and swept) is not put
-- back: its slot may have been taken meanwhile.
--
-- KEYS[1]  the concurrency leases of decide.lua (KEYS[4] there)
-- ARGV[1]  lease lifetime in ms
-- ARGV[2..] the leases
local t = redis.call('TIME')
local now_ms = math.floor((tonumber(t[1]) * 1000000 + tonumber(t[2])) / 1000)
local ttl = tonumber(ARGV[1])
local kept = 0
for i = 2, #ARGV do
  kept = kept + redis.call('ZADD', KEYS[1], 'XX', 'CH', now_ms + ttl, ARGV[i])
end
if kept > 0 and redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return kept

-- Writes a new session with its expiry, atomically: no moment exists in which the hash is
-- there without its TTL.
--
-- KEYS[1]  the session's hash
-- ARGV[1]  inactivity timeout (ms)
-- ARGV[2]  absolute end of life (Unix ms)
-- ARGV[3..] field, value, field, value, ...
--
-- Returns 1 when written, 0 when the session would already be dead.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - now)
if ttl <= 0 then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1

-- Renews (or writes again, after Redis lost them) the leases of several members of one key:
-- `ARGV[1]` the lease, then member, metadata pairs. With one key, `KEYS[2]` absent, only the
-- sorted set is written (a tenant's count).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  if KEYS[2] then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
if KEYS[2] then redis.call('PEXPIRE', KEYS[2], ttl * 2) end
return 1

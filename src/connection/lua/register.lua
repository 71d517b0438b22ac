-- Takes a lease: drops ended leases, refuses past the cap (`ARGV[3]`, 0 for none), then
-- writes the member's lease and metadata. Answers `{admitted, live}`.
--
-- KEYS[1] the user's lease set, KEYS[2] their metadata hash; ARGV[1] the member, ARGV[2] the
-- lease (ms), ARGV[3] the cap, ARGV[4] the metadata.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZCARD', KEYS[1])
if max > 0 and live >= max and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, live}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return {1, redis.call('ZCARD', KEYS[1])}

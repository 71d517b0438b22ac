-- The live members of a key, with their metadata when `KEYS[2]` is given.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if not KEYS[2] or #members == 0 then return {members, {}} end
return {members, redis.call('HMGET', KEYS[2], unpack(members))}

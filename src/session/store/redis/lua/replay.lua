-- Replays one write that an instance journaled while Redis was unreachable. Each field is
-- written only if Redis holds no newer write of it: a field's last write time is its
-- 't:<field>' (set by every save), or the session's creation time when it has none. Replaying
-- the same write twice leaves the same state, so a replay cut short can simply run again.
--
-- KEYS[1]  the session's hash
-- ARGV[1]  'create': the session was created during the outage (or is the new id of a session
--          moved during it): the hash is written if absent. 'patch': the session must exist;
--          a session gone from Redis (destroyed, expired) is never brought back.
-- ARGV[2]  the journaled write's time (Unix ms)
-- ARGV[3]  number of base pairs (b), written as they are when the hash is absent (create only)
-- ARGV[4]  number of fields to set (n)
-- ARGV[5]  number of fields to delete (d)
-- ARGV[6 ..]  b base pairs, n field/value pairs, d field names
--
-- Returns 1 when applied (fields older than Redis's are skipped), 0 when the session is gone
-- (or the replayed change ends its life: it is then deleted).
-- A session is a hash with metadata: what a save to a gone session leaves is not one.
local exists = redis.call('HEXISTS', KEYS[1], 'm:tenant') == 1
if not exists and ARGV[1] ~= 'create' then
  return 0
end
local at = tonumber(ARGV[2])
local b, n, d = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local i = 6
if not exists then
  for j = i, i + 2 * b - 1, 2 do
    redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
  end
end
i = i + 2 * b

local created = tonumber(redis.call('HGET', KEYS[1], 'm:created')) or 0
local function not_newer(field)
  local written = tonumber(redis.call('HGET', KEYS[1], 't:' .. field)) or created
  return written <= at
end
for j = i, i + 2 * n - 1, 2 do
  if not_newer(ARGV[j]) then
    redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1], 't:' .. ARGV[j], at)
  end
end
i = i + 2 * n
for j = i, i + d - 1 do
  if not_newer(ARGV[j]) then
    redis.call('HDEL', KEYS[1], ARGV[j])
    redis.call('HSET', KEYS[1], 't:' .. ARGV[j], at)
  end
end

local meta = redis.call('HMGET', KEYS[1], 'm:abs', 'm:idle')
local abs, idle = tonumber(meta[1]), tonumber(meta[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if not abs or not idle or math.min(idle, abs - now) <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], math.min(idle, abs - now))
return 1

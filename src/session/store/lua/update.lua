-- Applies the changed fields of an existing session and restarts its inactivity clock. A
-- session that is gone stays gone: nothing is written for it.
--
-- Every field written or removed gets its write time in 't:<field>', so that writes journaled
-- by an instance during an outage are replayed only over older writes (see replay.lua). A
-- field without one was last written when the session was created. The time is the writer's,
-- taken when it made the write, not Redis's when it runs the script: a write held up by a
-- stalled Redis and run late must not look newer than the writes journaled after it.
--
-- KEYS[1]  the session's hash
-- ARGV[1]  number of fields to set (n): data fields, and metadata fields when the session's
--          expiry settings changed (m:idle, m:abs, m:persist)
-- ARGV[2]  number of fields to delete (d)
-- ARGV[3]  the write's time (Unix ms)
-- ARGV[4 .. 3+2n]         field, value pairs to set
-- ARGV[4+2n .. 3+2n+d]    fields to delete
--
-- Returns 1 when applied, 0 when the session does not exist (or the change ends its life: it
-- is then deleted).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local n = tonumber(ARGV[1])
local d = tonumber(ARGV[2])
local written = ARGV[3]
for i = 4, 3 + 2 * n, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], 't:' .. ARGV[i], written)
end
for i = 4 + 2 * n, 3 + 2 * n + d do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('HSET', KEYS[1], 't:' .. ARGV[i], written)
end

local meta = redis.call('HMGET', KEYS[1], 'm:abs', 'm:idle')
local abs, idle = tonumber(meta[1]), tonumber(meta[2])
if not abs or not idle or math.min(idle, abs - now) <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], math.min(idle, abs - now))
return 1

-- At most N live sessions per user, decided atomically across instances: a user's logins in a
-- sorted set (score: the session's creation in Unix ms; member: its store hash), so that of
-- several logins at once each sees the others, and each session over the cap is ended by one
-- login only. The caller lists the user's sessions first (src/session/store/redis/users.rs).
--
-- KEYS[1]  the user's logins
-- ARGV[1]  the most sessions the user may keep
-- ARGV[2]  the session logging in (its hash)
-- ARGV[3]  its creation (Unix ms)
-- ARGV[4]  the latest absolute end of the user's sessions (Unix ms): the set lives as long
-- ARGV[5]  how many sessions the listing found gone; their hashes follow
-- then     the live sessions the listing found, as creation, hash pairs
--
-- Returns the sessions to end, oldest first (ties by hash), marked ended in the set so that no
-- other login counts or ends them again. A session ended otherwise (a logout) is marked the
-- same way by its store (`RedisStore::delete`).

local max = tonumber(ARGV[1])
local login = ARGV[2]
local gone = tonumber(ARGV[5])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function int(n)
  return string.format('%.0f', n)
end

-- An ended session stays in the set for a minute, scored minus its end, so that a caller whose
-- listing still saw it live cannot count it again (ZADD NX below); older marks go.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. int(-(now - 60000)), '(0')
for i = 6, 5 + gone do
  redis.call('ZADD', KEYS[1], 'XX', int(-now), ARGV[i])
end
-- Sessions logged in by other paths (a journal's replay, a restore) join the ranking too.
for i = 6 + gone, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[1], 'NX', ARGV[3], login)

local live = redis.call('ZRANGEBYSCORE', KEYS[1], 0, '+inf')
local excess = #live - max
local ended = {}
for _, member in ipairs(live) do
  if #ended >= excess then
    break
  end
  if member ~= login then
    ended[#ended + 1] = member
  end
end
for _, member in ipairs(ended) do
  redis.call('ZADD', KEYS[1], 'XX', int(-now), member)
end
redis.call('PEXPIREAT', KEYS[1], ARGV[4], 'NX')
redis.call('PEXPIREAT', KEYS[1], ARGV[4], 'GT')
return ended

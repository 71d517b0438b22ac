-- At most N live sessions per user, decided atomically across instances: a user's logins in a
-- sorted set (score: the session's creation in Unix ms; member: its store hash), so that of
-- several logins at once each sees the others. The caller lists the user's sessions first
-- (src/session/store/redis/users.rs).
--
-- KEYS[1]  the user's logins
-- ARGV[1]  'end': a login is stored; answer the sessions it ends (the oldest others beyond
--          the cap). 'hold': a login is about to be made under a refusing cap; answer 1 and
--          hold a place for it, or 0 when the user has no room
-- ARGV[2]  the most sessions the user may keep
-- ARGV[3]  the session logging in (its hash), or '' for one not stored yet
-- ARGV[4]  its creation (Unix ms)
-- ARGV[5]  the latest absolute end of the user's sessions (Unix ms): the set lives as long
-- ARGV[6]  'end': a place held for this login, to give back ('' for none); 'hold': the name
--          of the place to hold
-- ARGV[7]  how many sessions the listing found gone; their hashes follow
-- then     the live sessions the listing found, as creation, hash pairs
--
-- An ended session stays in the set for a minute, scored minus its end, so that a caller
-- whose listing still saw it live cannot count it again (ZADD NX). A session ended otherwise
-- (a logout) is marked the same way by its store (`RedisStore::delete`). A held place (named
-- 'p:...') counts as a session until the login is stored, or for a minute at most.

local mode, max, login = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local gone = tonumber(ARGV[7])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function int(n)
  return string.format('%.0f', n)
end
local function held(member)
  return string.sub(member, 1, 2) == 'p:'
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. int(-(now - 60000)), '(0')
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], 0, int(now - 60000))) do
  if held(member) then
    redis.call('ZREM', KEYS[1], member)
  end
end
for i = 8, 7 + gone do
  redis.call('ZADD', KEYS[1], 'XX', int(-now), ARGV[i])
end
-- Sessions logged in by other paths (a journal's replay, a restore) join the ranking too.
for i = 8 + gone, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
end
local function keep()
  redis.call('PEXPIREAT', KEYS[1], ARGV[5], 'NX')
  redis.call('PEXPIREAT', KEYS[1], ARGV[5], 'GT')
end

if mode == 'hold' then
  if login ~= '' then
    local score = tonumber(redis.call('ZSCORE', KEYS[1], login))
    if score and score >= 0 then
      -- Already one of the user's sessions: it holds its own place.
      return 1
    end
  end
  if redis.call('ZCOUNT', KEYS[1], 0, '+inf') >= max then
    return 0
  end
  redis.call('ZADD', KEYS[1], now, ARGV[6])
  keep()
  return 1
end

if ARGV[6] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[6])
end
redis.call('ZADD', KEYS[1], 'NX', ARGV[4], login)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], 0, '+inf')
local excess = #live - max
local ended = {}
for _, member in ipairs(live) do
  if #ended >= excess then
    break
  end
  if member ~= login and not held(member) then
    ended[#ended + 1] = member
  end
end
for _, member in ipairs(ended) do
  redis.call('ZADD', KEYS[1], 'XX', int(-now), member)
end
keep()
return ended

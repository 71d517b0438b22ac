-- Sliding log: one sorted-set member per unit of cost spent, scored by its time. A unit counts
-- for exactly one window after it was spent, so the limit holds over every window-long span.
-- Memory grows with the limit: meant for small limits such as login attempts.
--
-- KEYS[1]  sorted set: score = time spent (µs), member = '<time>:<n>', n counting the units
--          spent at that same time, so that every unit is its own member
-- ARGV[1]  decision time in microseconds since the Unix epoch, or '' for Redis TIME
-- ARGV[2]  window (microseconds)
-- ARGV[3]  limit
-- ARGV[4]  cost (0 only reads)
--
-- Answers `answer(allowed (1 or 0), remaining, reset (µs), retry after (µs; -1 when allowed or
-- never))`. The loader (src/ratelimit/store/redis.rs) defines `answer`: the script's reply text
-- when the algorithm runs alone, the four numbers for penalty.lua or settle.lua around it.
--
-- Every number stays an integer below 2^53, exact in Lua's doubles; MemoryRateStore
-- (memory.rs) repeats the same arithmetic, so both stores make the same decisions.

-- The arguments, `now`, `at`, `window`, `limit`, `cost` and `int` come from prelude.lua.

-- A unit spent at t counts while now < t + window.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - window))
-- On Redis's clock no unit is spent in the future: such members are corruption (or a foreign
-- write) and would block the key for good.
if ARGV[1] == '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. int(now), '+inf')
end
local count = redis.call('ZCARD', KEYS[1])
local allowed = cost <= limit and count + cost <= limit
if allowed and cost > 0 then
  -- Units at one score are only ever trimmed together, so those at `now` are numbered
  -- 1..taken, and the new ones continue the sequence without colliding.
  local taken = redis.call('ZCOUNT', KEYS[1], int(now), int(now))
  local batch = {}
  for n = taken + 1, taken + cost do
    batch[#batch + 1] = int(now)
    batch[#batch + 1] = int(now) .. ':' .. int(n)
    -- Bounded batches keep `unpack` within Lua's stack for large costs.
    if #batch >= 1000 or n == taken + cost then
      redis.call('ZADD', KEYS[1], unpack(batch))
      batch = {}
    end
  end
  count = count + cost
end

-- The full limit is back once the newest unit leaves the window.
local reset = 0
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
  reset = tonumber(newest[2]) + window - now
end
if allowed and cost > 0 then
  redis.call('PEXPIRE', KEYS[1], int(math.ceil(reset / 1000)))
end

local remaining = limit - count
if remaining < 0 then
  remaining = 0
end
if allowed then
  return answer(1, remaining, reset, -1)
end
if cost > limit then
  return answer(0, remaining, reset, -1)
end
-- The same cost fits once the (count + cost - limit) oldest units have left the window.
local rank = count + cost - limit - 1
local blocking = redis.call('ZRANGE', KEYS[1], rank, rank, 'WITHSCORES')
return answer(0, remaining, reset, tonumber(blocking[2]) + window - now)

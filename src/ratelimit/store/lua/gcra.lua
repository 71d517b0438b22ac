-- GCRA (generic cell rate algorithm): one number per key, the theoretical arrival time (TAT),
-- the time at which the key is back to a full burst. Each unit of cost pushes it one emission
-- interval (window / limit) later; a check is allowed while the TAT stays within one full burst
-- (limit intervals) of now. Smooth spacing with bursts up to the limit, O(1) state.
--
-- KEYS[1]  string: the TAT, in microseconds since the Unix epoch
-- ARGV[1]  decision time in microseconds since the Unix epoch, or '' for Redis TIME
-- ARGV[2]  window (microseconds)
-- ARGV[3]  limit (the burst)
-- ARGV[4]  cost (0 only reads)
--
-- Answers `answer(allowed (1 or 0), remaining, reset (µs), retry after (µs; -1 when allowed or
-- never))`. The loader (src/ratelimit/store/redis.rs) defines `answer`: the script's reply text
-- when the algorithm runs alone, the four numbers for penalty.lua or settle.lua around it.
--
-- Times are whole microseconds and the emission interval is window / limit rounded down to a
-- whole microsecond (at least 1), so every number is an integer below 2^53, exact in Lua's
-- doubles. The memory store runs the same arithmetic (ratelimit/algorithm/gcra.rs), and both
-- stores make the same decisions.

-- The arguments, `now`, `at`, `window`, `limit`, `cost` and `int` come from prelude.lua.

local interval = math.max(1, math.floor(window / limit))
local burst = limit * interval
-- A TAT in the past means a full burst is available: it counts as now.
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
-- On Redis's clock no write of this script leaves the TAT more than a burst ahead: a value
-- beyond that is corruption (or a foreign write), and counts as a full burst.
if ARGV[1] == '' and tat > now + burst then
  tat = now
end

local allowed = cost <= limit and tat - now + cost * interval <= burst
if allowed and cost > 0 then
  tat = tat + cost * interval
  -- Once the TAT has passed, the key holds nothing a missing key would not.
  redis.call('SET', KEYS[1], int(tat), 'PX', int(math.ceil((tat - now) / 1000)))
end

local remaining = math.floor((burst - (tat - now)) / interval)
if remaining < 0 then
  remaining = 0
end
if allowed then
  return answer(1, remaining, tat - now, -1)
end
if cost > limit then
  return answer(0, remaining, tat - now, -1)
end
return answer(0, remaining, tat - now, tat - now + cost * interval - burst)

-- Sliding-window counter: the count of the current fixed window plus the previous window's
-- count, weighted by the share of the previous window that the sliding window still covers.
-- O(1) state, and it smooths the burst a fixed window allows at its edge.
--
-- KEYS[1]  hash: w = index of the window counted in c (floor(time / window)), c = its count,
--          p = the count of the window before it
-- ARGV[1]  decision time in microseconds since the Unix epoch, or '' for Redis TIME
-- ARGV[2]  window (microseconds)
-- ARGV[3]  limit
-- ARGV[4]  cost (0 only reads)
--
-- Answers `answer(allowed (1 or 0), remaining, reset (µs), retry after (µs; -1 when allowed or
-- never))`. The loader (src/ratelimit/store/redis.rs) defines `answer`: the script's reply text
-- when the algorithm runs alone, the four numbers for penalty.lua or settle.lua around it.
--
-- Every number stays an integer below 2^51, so Lua's doubles compute it exactly, and
-- MemoryRateStore (memory.rs) repeats the same integer arithmetic in Rust: one trace of checks
-- gets the same decisions from both stores. Change one only together with the other.

-- The arguments, `now`, `at`, `window`, `limit`, `cost` and `int` come from prelude.lua.

local stored = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local index = math.floor(now / window)
local current, previous = 0, 0
-- A count that is not a whole number at least 0 was not written by this script (a corrupted
-- or foreign value): it counts as nothing, and the next write rewrites the whole key, deadline
-- included.
local repair = false
local function count(value)
  local n = tonumber(value)
  if n and n >= 0 and n == math.floor(n) then
    return n
  end
  repair = repair or value ~= false
  return 0
end
local counted = tonumber(stored[1])
-- On Redis's clock a stored window more than one window ahead can only be corruption (a clock
-- stepped back stays within one): the key starts again rather than staying stuck there.
if counted and ARGV[1] == '' and counted > index + 1 then
  counted = nil
  repair = true
end
if counted and counted >= index then
  -- Only an explicit time (or Redis's clock stepped back) can be earlier than the stored
  -- window; it counts as that window's start, so that time never runs backwards for one key.
  if counted > index then
    index = counted
    now = index * window
  end
  current, previous = count(stored[2]), count(stored[3])
elseif counted and counted == index - 1 then
  previous = count(stored[2])
end
local start = index * window

-- The previous window's weight is measured in ticks: 1 µs, unless limit * window is so large
-- that products would pass 2^51; then ticks coarsen just enough to keep every product below it.
local max_ticks = math.floor(2 ^ 51 / (3 * (limit + 1)))
local tick = math.floor((window + max_ticks - 1) / max_ticks)
local ticks = math.floor((window + tick - 1) / tick)
local overlap = ticks - math.floor((now - start) / tick)

-- estimate = previous * overlap / ticks + current; compared multiplied out, with no division.
local allowed = cost <= limit and previous * overlap + (current + cost) * ticks <= limit * ticks
if allowed and cost > 0 then
  current = current + cost
  if counted == index and not repair then
    -- Same window: only its count changes, and the key's deadline stays.
    redis.call('HSET', KEYS[1], 'c', int(current))
  else
    redis.call('HSET', KEYS[1], 'w', int(index), 'c', int(current), 'p', int(previous))
    -- Past the end of the next window, neither count matters any more: a deadline that
    -- depends on the window alone, so it is set once per window.
    redis.call('PEXPIRE', KEYS[1], int(math.ceil((start + 2 * window - now) / 1000)))
  end
end

local remaining = limit - current - math.floor((previous * overlap + ticks - 1) / ticks)
if remaining < 0 then
  remaining = 0
end
-- The full limit is back once the weighted previous count is gone and nothing is counted.
local reset = 0
if current > 0 then
  reset = start + 2 * window - now
elseif previous > 0 then
  reset = start + window - now
end
if allowed then
  return answer(1, remaining, reset, -1)
end
if cost > limit then
  return answer(0, remaining, reset, -1)
end

-- The earliest time the same cost fits, if nothing else is spent meanwhile. Later in this
-- window, the previous count's weight shrinks until it leaves room...
local retry
local spare = limit - current - cost
if spare >= 0 and previous > 0 then
  local need = ticks - math.floor(spare * ticks / previous)
  if need < ticks then
    retry = start + need * tick - now
  end
end
-- ...otherwise in the next window, where this window's count becomes the previous one, or at
-- the start of the window after it, when nothing counts any more.
if not retry then
  local need = 0
  if current > 0 then
    need = math.max(0, ticks - math.floor((limit - cost) * ticks / current))
  end
  if need < ticks then
    retry = start + window + need * tick - now
  else
    retry = start + 2 * window - now
  end
end
return answer(0, remaining, reset, retry)

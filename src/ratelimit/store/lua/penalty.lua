-- The penalty box, around the algorithm's script: when the script is loaded for a policy with a
-- penalty (src/ratelimit/store/redis.rs), the algorithm becomes the function `decide`, which
-- answers its four numbers, and this runs after it. A key refused `strikes` times within one
-- window is blocked for `block`; each further block, while it keeps being refused, doubles, up
-- to `max_block`; a key quiet for `quiet` after its last block is forgiven.
--
-- KEYS[2]  hash: s = refusals counted in the strike window, f = when that window started,
--          u = when the block ends, l = blocks since last forgiven, q = the last counted
--          refusal or the end of the last block, whichever is later (times in µs)
-- ARGV[5]  strikes
-- ARGV[6]  first block (µs)
-- ARGV[7]  longest block (µs)
-- ARGV[8]  quiet period (µs)
--
-- Answers, in the prelude's `REPLY` text, the algorithm's {allowed, remaining, reset, retry},
-- then 1 when refused by a block (0 otherwise), then when a block this check placed ends (µs
-- since the epoch; 0 for none), then the decision's time, which a settlement of its cost
-- names (settle.lua).
--
-- The memory store runs the same rules (ratelimit/algorithm/penalty.rs), line for line.

local strikes_needed = tonumber(ARGV[5])
local first_block = tonumber(ARGV[6])
local max_block = tonumber(ARGV[7])
local quiet = tonumber(ARGV[8])

local held = redis.call('HMGET', KEYS[2], 's', 'f', 'u', 'l', 'q')
-- A field that is not a whole number at least 0 was not written here: it counts as nothing.
local function field(i)
  local n = tonumber(held[i])
  if n and n >= 0 and n == math.floor(n) then
    return n
  end
  return 0
end
local strikes, since, block_end, level, last = field(1), field(2), field(3), field(4), field(5)

if block_end > at then
  return string.format(REPLY, 0, 0, block_end - at, block_end - at, 1, 0, at)
end
if at - last >= quiet then
  if held[5] then
    redis.call('DEL', KEYS[2])
  end
  strikes, since, block_end, level, last = 0, 0, 0, 0, 0
end

local result = decide()
-- A refusal of a cost that could fit is a strike; one that never fits (a cost over the limit)
-- is the policy's doing, not the client's.
if result[1] == 1 or cost == 0 or result[4] < 0 then
  return string.format(REPLY, result[1], result[2], result[3], result[4], 0, 0, at)
end

if strikes == 0 or at - since >= window then
  strikes = 0
  since = at
end
strikes = strikes + 1
last = math.max(last, at)
local placed = 0
if strikes >= strikes_needed then
  -- Doubling stops at 2^40: past it any block is at its cap, and the product stays exact.
  local block = math.min(first_block * 2 ^ math.min(level, 40), max_block)
  level = level + 1
  strikes = 0
  block_end = at + block
  last = block_end
  placed = block_end
  result[2] = 0
  result[3] = math.max(result[3], block)
  result[4] = math.max(result[4], block)
end
redis.call('HSET', KEYS[2], 's', int(strikes), 'f', int(since), 'u', int(block_end),
  'l', int(level), 'q', int(last))
-- Past the quiet period after the last offence, the key is forgiven: nothing to keep.
redis.call('PEXPIRE', KEYS[2], int(math.max(1, math.ceil((last + quiet - at) / 1000))))
if placed > 0 then
  return string.format(REPLY, 0, result[2], result[3], result[4], 1, placed, at)
end
return string.format(REPLY, 0, result[2], result[3], result[4], 0, 0, at)

-- A settlement: the cost a request reserved (ARGV[4], which the prelude reads as `cost`) is
-- corrected to what the response says it cost. Loaded after the prelude, the algorithm made
-- the function `decide`, and the algorithm's `refund` (src/ratelimit/store/redis.rs).
--
-- ARGV[5]  the cost the request turned out to have
-- ARGV[6]  when the reservation was counted (µs since the epoch; the decision's time)
--
-- A refund gives the difference back where the reservation was counted. A top-up spends it
-- now, as a request would, but never more than is left: a settlement does not put a key in
-- debt. Answers what a check of cost 0 would answer afterwards, as allowed, in the prelude's
-- `REPLY` text: 1, remaining, reset, -1 (no block, no time). The memory store runs the same
-- steps (ratelimit/store/memory.rs, `settle`).

local reserved = cost
local actual = tonumber(ARGV[5])
if actual < reserved then
  refund(reserved - actual, tonumber(ARGV[6]))
end
cost = 0
local state = decide()
if actual > reserved and state[2] > 0 then
  cost = math.min(actual - reserved, state[2])
  state = decide()
end
return string.format(REPLY, 1, state[2], state[3], -1, 0, 0, 0)

-- Gives back `units` of a cost the sliding log counted at `reserved_at` (µs): the members at
-- that time are numbered 1..n, and the highest go, so the numbering stays unbroken. Units that
-- already left the window need no refund. The memory store does the same
-- (ratelimit/algorithm/log.rs, `refund`).
local function refund(units, reserved_at)
  local held = redis.call('ZCOUNT', KEYS[1], int(reserved_at), int(reserved_at))
  local batch = {}
  for n = held, math.max(1, held - units + 1), -1 do
    batch[#batch + 1] = int(reserved_at) .. ':' .. int(n)
    -- Bounded batches keep `unpack` within Lua's stack for large refunds.
    if #batch >= 1000 or n == math.max(1, held - units + 1) then
      redis.call('ZREM', KEYS[1], unpack(batch))
      batch = {}
    end
  end
end

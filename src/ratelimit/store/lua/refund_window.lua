-- Gives back `units` of a cost the sliding window counted at `reserved_at` (µs): to the
-- window's count if it is still the current one in the key, or to the previous count if it is
-- the one before; a cost counted earlier no longer weighs on anything. A count that is not a
-- whole number (corruption) is left to the next decision to repair. The memory store does the
-- same (ratelimit/algorithm/window.rs, `refund`).
local function refund(units, reserved_at)
  local stored = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
  local function whole(value)
    local n = tonumber(value)
    if n and n >= 0 and n == math.floor(n) then
      return n
    end
    return nil
  end
  local counted, current, previous = whole(stored[1]), whole(stored[2]), whole(stored[3])
  if not (counted and current and previous) then
    return
  end
  local reserved = math.floor(reserved_at / window)
  if reserved == counted then
    redis.call('HSET', KEYS[1], 'c', int(current - math.min(units, current)))
  elseif reserved == counted - 1 then
    redis.call('HSET', KEYS[1], 'p', int(previous - math.min(units, previous)))
  end
end

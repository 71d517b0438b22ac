-- Gives back `units`: the theoretical arrival time moves `units` emission intervals earlier,
-- but not before now (a time in the past already means a full burst). The memory store does
-- the same (ratelimit/algorithm/gcra.rs, `refund`).
local function refund(units, reserved_at)
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if not tat or tat <= now then
    return
  end
  local interval = math.max(1, math.floor(window / limit))
  local back = tat - units * interval
  if back <= now then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], int(back), 'PX', int(math.ceil((back - now) / 1000)))
  end
end

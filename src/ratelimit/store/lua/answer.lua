-- How an algorithm answers when it runs alone, loaded between prelude.lua and the algorithm
-- (src/ratelimit/store/redis.rs): its four numbers become the script's reply text, with no
-- block and the decision's time. Around penalty.lua or settle.lua, `answer` instead returns the
-- four numbers to them.
local function answer(allowed, remaining, reset, retry)
  -- REPLY with its zeros written in: two conversions fewer, on the path every check takes.
  return string.format('%d %d %d %d 0 0 %d', allowed, remaining, reset, retry, at)
end

-- The common start of every rate-limit script, prepended to each when it is loaded
-- (src/ratelimit/store/redis.rs): the arguments, the decision time, and the limit-0 answer.
--
-- ARGV[1]  decision time in microseconds since the Unix epoch, or '' for Redis TIME
-- ARGV[2]  window (microseconds)
-- ARGV[3]  limit
-- ARGV[4]  cost (0 only reads)

-- Lua turns numbers into strings with 14 significant digits, which would round timestamps.
local function int(n)
  return string.format('%.0f', n)
end

local now
if ARGV[1] == '' then
  -- Redis's clock, not the caller's: instances with skewed clocks still agree.
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
else
  now = tonumber(ARGV[1])
end
-- The decision's time, as the caller named it or Redis read it: every reply ends with it, and
-- a settlement of the decision's cost names it (settle.lua).
local at = now
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
-- Every script answers with one text of seven integers, "allowed remaining reset retry blocked
-- block_end time" (see penalty.lua for the last three), written with this format: one bulk
-- reply is much cheaper for the client to read than an array of seven
-- (src/ratelimit/store/redis.rs, `read_reply`). `%d` truncates as Redis's own conversion of a
-- Lua number would. (A string, not a function: a function defined here would be made anew on
-- every call.)
local REPLY = '%d %d %d %d %d %d %d'
if limit == 0 then
  return string.format(REPLY, 0, 0, 0, -1, 0, 0, 0)
end

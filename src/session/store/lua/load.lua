-- Loads one session and restarts its inactivity clock, in one round trip.
--
-- KEYS[1]  the session's hash
-- ARGV[1]  the tenant asking for it
--
-- Returns {0} when there is no live session; {2} when the key held something that is not a
-- well-formed session (it is deleted, so the next save starts clean); otherwise
-- {1, field, value, field, value, ...} with every field of the hash.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  return {0}
end
if kind ~= 'hash' then
  redis.call('DEL', KEYS[1])
  return {2}
end

local fields = redis.call('HGETALL', KEYS[1])
local abs, idle, tenant
for i = 1, #fields, 2 do
  local name = fields[i]
  if name == 'm:abs' then
    abs = tonumber(fields[i + 1])
  elseif name == 'm:idle' then
    idle = tonumber(fields[i + 1])
  elseif name == 'm:tenant' then
    tenant = fields[i + 1]
  end
end
if not abs or not idle or not tenant then
  redis.call('DEL', KEYS[1])
  return {2}
end
-- The key already carries the tenant; this guards against a record copied under another one.
if tenant ~= ARGV[1] then
  return {0}
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = math.min(idle, abs - now)
if ttl <= 0 then
  redis.call('DEL', KEYS[1])
  return {0}
end
redis.call('PEXPIRE', KEYS[1], ttl)

table.insert(fields, 1, 1)
return fields

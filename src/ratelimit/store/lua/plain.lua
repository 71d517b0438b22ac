-- The end of a script for a policy without a penalty (src/ratelimit/store/redis.rs): the
-- algorithm, made the function `decide`, answers its four numbers, and the reply adds the
-- shape penalty.lua answers (not blocked, no block placed) and the decision's time, which a
-- settlement of its cost names (settle.lua).

local at = now
local result = decide()
return {result[1], result[2], result[3], result[4], 0, 0, at}

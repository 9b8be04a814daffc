-- Lengthen the shared LLM cool-down (see worker/classification/ratelimit.py); never shorten one
-- already longer.
-- KEYS[1]: the cool-down key. ARGV[1]: the cool-down from now (ms).
-- Answer: 1.
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 1

-- GCRA reservation of the next LLM call slot on the Redis clock (see
-- worker/classification/ratelimit.py).
-- KEYS[1]: the pacing key (next free slot, in µs of the Redis clock); KEYS[2]: the cool-down key.
-- ARGV[1]: interval between slots (µs, 0 = unlimited); ARGV[2]: burst allowance (µs).
-- Answer: {reserved, wait_us}: reserved = 1, wait wait_us until the slot; reserved = 0, a
-- cool-down is on: ask again after wait_us.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cool_ms = redis.call('PTTL', KEYS[2])
if cool_ms > 0 then
  return {0, cool_ms * 1000}
end
local interval = tonumber(ARGV[1])
if interval <= 0 then
  return {1, 0}
end
local stored = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local slot = math.max(stored, now - tonumber(ARGV[2]))
local next_free = slot + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_free),
  'PX', math.floor((next_free - now) / 1000) + 1000)
return {1, math.max(0, slot - now)}

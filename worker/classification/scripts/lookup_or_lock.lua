-- Single flight, step one (see worker/classification/locks.py): per cache entry, its value if
-- there is one; otherwise its lock, taken with our token, if it is free or holds a failure mark.
-- KEYS: two per entry, the value key and the lock key.
-- ARGV[1]: lock TTL (ms); ARGV[2]: the failure mark; then ARGV[i + 2]: our token for entry i.
-- Answer: per entry, the value (a string); 1 = lock taken; 0 = lock held by another.
local out = {}
for i = 1, #KEYS / 2 do
  local value = redis.call('GET', KEYS[2 * i - 1])
  if value then
    out[i] = value
  elseif redis.call('SET', KEYS[2 * i], ARGV[i + 2], 'NX', 'PX', ARGV[1]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[2 * i]) == ARGV[2] then  -- a failure mark: take the lock over it
    redis.call('SET', KEYS[2 * i], ARGV[i + 2], 'PX', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out

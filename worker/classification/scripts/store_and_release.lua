-- Single flight, the owner's last step (see worker/classification/locks.py): per entry, write
-- the value (if any) and delete the lock if it still holds our token (owner-checked), so a free
-- lock with no value always means a real miss.
-- KEYS: two per entry, the value key and the lock key.
-- ARGV: three per entry, our token ('' = none), the value ('' = none), the value's TTL (s).
-- Answer: per entry, 1 the lock was ours and is deleted, 0 not.
local out = {}
for i = 1, #KEYS / 2 do
  local token, value = ARGV[3 * i - 2], ARGV[3 * i - 1]
  if value ~= '' then
    redis.call('SET', KEYS[2 * i - 1], value, 'EX', ARGV[3 * i])
  end
  out[i] = 0
  if token ~= '' and redis.call('GET', KEYS[2 * i]) == token then
    redis.call('DEL', KEYS[2 * i])
    out[i] = 1
  end
end
return out

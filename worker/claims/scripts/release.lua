-- Owner-checked release of a batch of leases (see worker/claims/redis_store.py).
-- KEYS: the lease keys; ARGV[i]: the token that owns KEYS[i].
-- Answer: per key, 1 deleted (it held our token) or 0 (it is gone or someone else's).
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('DEL', KEYS[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out

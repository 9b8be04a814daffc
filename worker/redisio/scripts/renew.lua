-- Owner-checked renewal of a batch of leases (claims) or locks (single flight).
-- KEYS: the lease keys, one per lease.
-- ARGV[1]: the new TTL in milliseconds; ARGV[i + 1]: the token that owns KEYS[i].
-- Answer: per key, 1 renewed (the key held our token) or 0 (it is gone or someone else's).
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out

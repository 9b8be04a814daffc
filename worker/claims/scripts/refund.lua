-- Owner-checked release that also gives back the attempt the claim counted: the message did not
-- get to make it (the classifier's circuit breaker was open). See worker/claims/redis_store.py.
-- KEYS[1]: the lease key, KEYS[2]: the attempts key; ARGV[1]: the token that owns KEYS[1].
-- Answer: 1 released and given back, 0 the lease is gone or someone else's (nothing changed).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local started = tonumber(redis.call('GET', KEYS[2]) or '0')
if started > 1 then
  redis.call('DECR', KEYS[2])
elseif started == 1 then
  redis.call('DEL', KEYS[2])
end
return 1

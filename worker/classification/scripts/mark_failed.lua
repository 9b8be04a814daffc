-- Single flight, when the owner's computation failed (see worker/classification/locks.py): turn
-- our lock into a short-lived failure mark, so that the replicas waiting on it fail too.
-- KEYS[1]: the lock key.
-- ARGV[1]: the failure mark's lifetime (ms); ARGV[2]: the mark; ARGV[3]: our token.
-- Answer: 1 marked, 0 the lock was not ours (any more).
if redis.call('GET', KEYS[1]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
  return 1
end
return 0

-- Claim a batch of message IDs (see worker/claims/redis_store.py).
-- KEYS[1]: a counters shard; then per ID, three keys: its done marker, its lease, its attempts.
-- ARGV[1]: lease (ms); ARGV[2]: max attempts (0: never refuse); ARGV[3]: attempts TTL (s);
-- then per ID, two values: its token and 2 * suspect_at + redelivered (0/1).
-- Answer: two numbers per ID, (status, value):
--   0 claimed (value: attempts started, this one included), 1 done, 2 busy (value: ms left on
--   the owner's lease), 3 exhausted and 4 suspect (value: attempts started before).
-- Counters (fields of KEYS[1], the names of CounterName): duplicates, redelivered_done.
local DUPLICATES, REDELIVERED_DONE = 'duplicates', 'redelivered_done'
local lease_ms, max_attempts, attempts_ttl_s = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
local duplicates, redelivered = 0, 0
for i = 1, (#KEYS - 1) / 3 do
  local done_key, claim_key, attempts_key = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local token, flags = ARGV[2 * i + 2], tonumber(ARGV[2 * i + 3])
  if redis.call('EXISTS', done_key) == 1 then
    out[2 * i - 1], out[2 * i] = 1, 0
    if flags % 2 == 1 then redelivered = redelivered + 1 else duplicates = duplicates + 1 end
  elseif redis.call('SET', claim_key, token, 'NX', 'PX', lease_ms) then
    local attempts = 1
    if not redis.call('SET', attempts_key, 1, 'NX', 'EX', attempts_ttl_s) then
      attempts = redis.call('INCR', attempts_key)
    end
    local suspect_at = math.floor(flags / 2)
    if max_attempts > 0 and attempts > max_attempts then
      redis.call('DECR', attempts_key)
      redis.call('DEL', claim_key)
      out[2 * i - 1], out[2 * i] = 3, attempts - 1
    elseif suspect_at > 0 and attempts > suspect_at then
      redis.call('DECR', attempts_key)
      redis.call('DEL', claim_key)
      out[2 * i - 1], out[2 * i] = 4, attempts - 1
    else
      out[2 * i - 1], out[2 * i] = 0, attempts
    end
  else
    local ttl = redis.call('PTTL', claim_key)
    if ttl < 0 then ttl = tonumber(lease_ms) end
    out[2 * i - 1], out[2 * i] = 2, ttl
  end
end
if duplicates > 0 then redis.call('HINCRBY', KEYS[1], DUPLICATES, duplicates) end
if redelivered > 0 then redis.call('HINCRBY', KEYS[1], REDELIVERED_DONE, redelivered) end
return out

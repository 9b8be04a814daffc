-- Claim a batch of message IDs (see worker/claims/redis_store.py).
-- KEYS[1]: the counters hash.
-- ARGV[1]: lease (ms); ARGV[2]: max attempts (0: never refuse); ARGV[3]: attempts TTL (s);
-- ARGV[4], ARGV[5], ARGV[6]: the done, claim and attempts key stems (keys are stem .. ID);
-- then per ID, three values: the ID, its token, and 2 * suspect_at + redelivered (0/1).
-- Answer: two numbers per ID, (status, value):
--   0 claimed (value: attempts started, this one included), 1 done, 2 busy (value: ms left on
--   the owner's lease), 3 exhausted and 4 suspect (value: attempts started before).
-- Counters (fields of KEYS[1], the names of CounterName): duplicates, redelivered_done.
local DUPLICATES, REDELIVERED_DONE = 'duplicates', 'redelivered_done'
local lease_ms, max_attempts, attempts_ttl_s = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local done_stem, claim_stem, attempts_stem = ARGV[4], ARGV[5], ARGV[6]
local out = {}
local duplicates, redelivered = 0, 0
for i = 1, (#ARGV - 6) / 3 do
  local id, token, flags = ARGV[3 * i + 4], ARGV[3 * i + 5], tonumber(ARGV[3 * i + 6])
  local claim_key = claim_stem .. id
  if redis.call('EXISTS', done_stem .. id) == 1 then
    out[2 * i - 1], out[2 * i] = 1, 0
    if flags % 2 == 1 then redelivered = redelivered + 1 else duplicates = duplicates + 1 end
  elseif redis.call('SET', claim_key, token, 'NX', 'PX', lease_ms) then
    local attempts_key = attempts_stem .. id
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

-- Complete a batch of claims (see worker/claims/redis_store.py): per ID whose lease still holds
-- our token, write its done marker, drop the lease and the attempt count; then add the completed
-- messages to the counters and to this second's throughput bucket, all in one script, so a crash
-- cannot leave a counted message without its marker, or the reverse.
-- KEYS[1]: the counters hash.
-- ARGV[1]: done TTL (s); ARGV[2]: throughput bucket TTL (s);
-- ARGV[3], ARGV[4], ARGV[5]: the done, claim and attempts key stems (keys are stem .. ID);
-- then per ID, three values: the ID, the owner's token, '1' for a cache hit ('0' not);
-- last: the throughput bucket stem (the bucket is stem .. the Redis clock's second).
-- Answer: per ID, 1 completed, 0 the claim is not ours (any more).
-- Counting: count_completed.lua (put in front of this script by the loader).
local ttl_s, bucket_ttl_s = ARGV[1], ARGV[2]
local done_stem, claim_stem, attempts_stem = ARGV[3], ARGV[4], ARGV[5]
local out = {}
local processed, hits = 0, 0
for i = 1, (#ARGV - 6) / 3 do
  local id = ARGV[3 * i + 3]
  local claim_key = claim_stem .. id
  if redis.call('GET', claim_key) == ARGV[3 * i + 4] then
    redis.call('SET', done_stem .. id, '1', 'EX', ttl_s)
    redis.call('DEL', claim_key, attempts_stem .. id)
    processed = processed + 1
    if ARGV[3 * i + 5] == '1' then hits = hits + 1 end
    out[i] = 1
  else
    out[i] = 0
  end
end
count_completed(KEYS[1], processed, hits, ARGV[#ARGV], bucket_ttl_s)
return out

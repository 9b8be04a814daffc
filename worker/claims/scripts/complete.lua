-- Complete a batch of claims (see worker/claims/redis_store.py): per ID whose lease still holds
-- our token, or whose lease is gone with no done marker written (it lapsed with nobody else
-- claiming, or a failover lost it: our result is published, so the ID is done), write its done
-- marker, drop the lease and the attempt count; then add the completed
-- messages to the counters and to this second's throughput, all in one script, so a crash
-- cannot leave a counted message without its marker, or the reverse.
-- KEYS[1]: a counters shard; KEYS[2]: the same shard's throughput hash of this minute;
-- then per ID, three keys: its done marker, its lease, its attempts.
-- ARGV[1]: done TTL (s); ARGV[2]: throughput hash TTL (s); ARGV[3]: the caller's epoch second
-- (the field of KEYS[2]; the caller's clock, so the script needs no TIME);
-- then per ID, two values: the owner's token, '1' for a cache hit ('0' not).
-- Answer: per ID, 1 completed, 0 the claim is another replica's, or the ID is done already.
-- Counting: count_completed.lua (put in front of this script by the loader).
local ttl_s = ARGV[1]
local out = {}
local processed, hits = 0, 0
for i = 1, (#KEYS - 2) / 3 do
  local claim_key = KEYS[3 * i + 1]
  local owner = redis.call('GET', claim_key)
  if owner == ARGV[2 * i + 2] or (not owner and redis.call('EXISTS', KEYS[3 * i]) == 0) then
    redis.call('SET', KEYS[3 * i], '1', 'EX', ttl_s)
    redis.call('DEL', claim_key, KEYS[3 * i + 2])
    processed = processed + 1
    if ARGV[2 * i + 3] == '1' then hits = hits + 1 end
    out[i] = 1
  else
    out[i] = 0
  end
end
count_completed(KEYS[1], KEYS[2], ARGV[3], ARGV[2], processed, hits)
return out

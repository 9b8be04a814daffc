-- Record the completions made while Redis was unreachable (see worker/claims/fallback.py).
-- A completion is counted only if its done marker was not there yet: a completion script whose
-- answer was lost with the connection may have counted it already.
-- KEYS[1]: the counters hash; then per ID, two keys: its done marker and its attempt counter.
-- ARGV[1]: done TTL (s); ARGV[2]: throughput bucket TTL (s); then per ID: '0' (claimed in memory,
-- counted already), '1' (a cache miss to count) or '2' (a hit to count);
-- last: the throughput bucket stem (the bucket is stem .. the Redis clock's second).
-- Answer: how many completions were counted.
-- Counters (fields of KEYS[1], the names of CounterName): processed, cache_hits, cache_misses.
-- The counting tail is the same as in complete.lua.
local PROCESSED, CACHE_HITS, CACHE_MISSES = 'processed', 'cache_hits', 'cache_misses'
local ttl_s, bucket_ttl_s = ARGV[1], ARGV[2]
local processed, hits = 0, 0
local n = (#KEYS - 1) / 2
for i = 1, n do
  local fresh = redis.call('SET', KEYS[2 * i], '1', 'NX', 'EX', ttl_s)
  redis.call('DEL', KEYS[2 * i + 1])
  local kind = ARGV[i + 2]
  if fresh and kind ~= '0' then
    processed = processed + 1
    if kind == '2' then hits = hits + 1 end
  end
end
if processed > 0 then
  redis.call('HINCRBY', KEYS[1], PROCESSED, processed)
  if hits > 0 then redis.call('HINCRBY', KEYS[1], CACHE_HITS, hits) end
  if processed > hits then redis.call('HINCRBY', KEYS[1], CACHE_MISSES, processed - hits) end
  local bucket = ARGV[#ARGV] .. redis.call('TIME')[1]
  redis.call('INCRBY', bucket, processed)
  redis.call('EXPIRE', bucket, bucket_ttl_s)
end
return processed

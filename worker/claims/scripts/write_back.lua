-- Record the completions made while Redis was unreachable (see worker/claims/fallback.py).
-- A completion is counted only if its done marker was not there yet: a completion script whose
-- answer was lost with the connection may have counted it already.
-- KEYS[1]: the counters hash; then per ID, two keys: its done marker and its attempt counter.
-- ARGV[1]: done TTL (s); ARGV[2]: throughput bucket TTL (s); then per ID: '0' (claimed in memory,
-- counted already), '1' (a cache miss to count) or '2' (a hit to count);
-- last: the throughput bucket stem (the bucket is stem .. the Redis clock's second).
-- Answer: how many completions were counted.
-- Counting: count_completed.lua (put in front of this script by the loader).
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
count_completed(KEYS[1], processed, hits, ARGV[#ARGV], bucket_ttl_s)
return processed

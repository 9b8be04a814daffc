-- Record the completions made while Redis was unreachable (see worker/claims/fallback.py).
-- A completion is counted only if its done marker was not there yet: a completion script whose
-- answer was lost with the connection may have counted it already.
-- KEYS[1]: a counters shard; KEYS[2]: the same shard's throughput hash of this minute;
-- then per ID, two keys: its done marker and its attempt counter.
-- ARGV[1]: done TTL (s); ARGV[2]: throughput hash TTL (s); ARGV[3]: the caller's epoch second;
-- then per ID: '0' (claimed in memory, counted already), '1' (a cache miss to count) or '2'
-- (a hit to count).
-- Answer: per ID, 1 counted now, 0 not.
-- Counting: count_completed.lua (put in front of this script by the loader).
local ttl_s = ARGV[1]
local processed, hits = 0, 0
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local fresh = redis.call('SET', KEYS[2 * i + 1], '1', 'NX', 'EX', ttl_s)
  redis.call('DEL', KEYS[2 * i + 2])
  local kind = ARGV[i + 3]
  out[i] = 0
  if fresh and kind ~= '0' then
    processed = processed + 1
    if kind == '2' then hits = hits + 1 end
    out[i] = 1
  end
end
count_completed(KEYS[1], KEYS[2], ARGV[3], ARGV[2], processed, hits)
return out

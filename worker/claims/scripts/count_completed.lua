-- Shared by complete.lua and write_back.lua, put in front of their text by the loader
-- (worker/redisio/scripts.py, LuaScript.library): add ``processed`` completions, ``hits`` of them
-- cache hits, to the counters hash and to this second's throughput bucket.
-- Counters (fields of the hash, the names of CounterName): processed, cache_hits, cache_misses.
local PROCESSED, CACHE_HITS, CACHE_MISSES = 'processed', 'cache_hits', 'cache_misses'
local function count_completed(stats_key, processed, hits, bucket_stem, bucket_ttl_s)
  if processed == 0 then return end
  redis.call('HINCRBY', stats_key, PROCESSED, processed)
  if hits > 0 then redis.call('HINCRBY', stats_key, CACHE_HITS, hits) end
  if processed > hits then redis.call('HINCRBY', stats_key, CACHE_MISSES, processed - hits) end
  local bucket = bucket_stem .. redis.call('TIME')[1]
  redis.call('INCRBY', bucket, processed)
  redis.call('EXPIRE', bucket, bucket_ttl_s)
end

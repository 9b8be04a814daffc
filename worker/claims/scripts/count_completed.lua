-- Shared by complete.lua and write_back.lua, put in front of their text by the loader
-- (worker/redisio/scripts.py, LuaScript.library): add ``processed`` completions, ``hits`` of them
-- cache hits, to a counters shard and to the field ``second`` of that shard's throughput hash.
-- Counters (fields of the hash, the names of CounterName): processed, cache_hits, cache_misses.
local PROCESSED, CACHE_HITS, CACHE_MISSES = 'processed', 'cache_hits', 'cache_misses'
local function count_completed(stats_key, throughput_key, second, throughput_ttl_s, processed, hits)
  if processed == 0 then return end
  redis.call('HINCRBY', stats_key, PROCESSED, processed)
  if hits > 0 then redis.call('HINCRBY', stats_key, CACHE_HITS, hits) end
  if processed > hits then redis.call('HINCRBY', stats_key, CACHE_MISSES, processed - hits) end
  redis.call('HINCRBY', throughput_key, second, processed)
  redis.call('EXPIRE', throughput_key, throughput_ttl_s)
end

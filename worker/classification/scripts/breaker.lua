-- One step of a classifier's circuit breaker (see worker/classification/breaker.py, whose
-- MemoryBreakerState is the same state machine for a replica without Redis).
-- KEYS[1]: the breaker hash. ARGV[1]: the step, then its arguments:
--   read
--   failure       kind, reason, threshold, first probe delay (ms), configuration delay (ms)
--   success
--   probe         probe lease (ms)
--   probe_failed  kind, reason, probe delay ceiling (ms), configuration delay (ms)
-- Fields: open (0/1), kind, reason, failures (consecutive, while closed), opened (Redis clock,
-- ms), next_probe (ms), delay (ms), probe_until (ms), opens, probes.
-- Answer: {open, kind, reason, failures, opened, ms until the next probe, changed, opens, probes}
-- where changed is 1 when this step opened the breaker (failure), closed it (success) or took
-- the probe (probe).
local key, step = KEYS[1], ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local h = redis.call('HMGET', key, 'open', 'kind', 'reason', 'failures', 'opened', 'next_probe',
  'delay', 'probe_until', 'opens', 'probes')
local open = h[1] == '1'
local kind, reason = h[2] or '', h[3] or ''
local failures = tonumber(h[4] or '0')
local opened, next_probe = tonumber(h[5] or '0'), tonumber(h[6] or '0')
local delay, probe_until = tonumber(h[7] or '0'), tonumber(h[8] or '0')
local opens, probes = tonumber(h[9] or '0'), tonumber(h[10] or '0')
local changed, dirty = 0, false

if step == 'failure' then
  local config_delay = tonumber(ARGV[6])
  if open then
    if ARGV[2] == 'configuration' and kind ~= 'configuration' then
      kind, reason, delay, next_probe = ARGV[2], ARGV[3], config_delay, now + config_delay
      dirty = true
    end
  else
    failures = failures + 1
    if ARGV[2] == 'configuration' or failures >= tonumber(ARGV[4]) then
      open, kind, reason, opened = true, ARGV[2], ARGV[3], now
      delay = ARGV[2] == 'configuration' and config_delay or tonumber(ARGV[5])
      next_probe, probe_until, opens, changed = now + delay, 0, opens + 1, 1
    end
    dirty = true
  end
elseif step == 'success' then
  if open or failures > 0 then
    if open then changed = 1 end
    open, failures, kind, reason, dirty = false, 0, '', '', true
  end
elseif step == 'probe' then
  if open and now >= next_probe and now >= probe_until then
    probe_until, probes, changed, dirty = now + tonumber(ARGV[2]), probes + 1, 1, true
  end
elseif step == 'probe_failed' then
  if open then
    kind, reason = ARGV[2], ARGV[3]
    if kind == 'configuration' then
      delay = tonumber(ARGV[5])
    else
      delay = math.min(tonumber(ARGV[4]), math.max(delay, 1) * 2)
    end
    next_probe, probe_until, dirty = now + delay, 0, true
  end
end

if dirty then
  redis.call('HSET', key, 'open', open and 1 or 0, 'kind', kind, 'reason', reason,
    'failures', failures, 'opened', opened, 'next_probe', next_probe, 'delay', delay,
    'probe_until', probe_until, 'opens', opens, 'probes', probes)
  redis.call('PEXPIRE', key, 604800000)
end
return {open and 1 or 0, kind, reason, failures, opened, math.max(0, next_probe - now), changed,
  opens, probes}

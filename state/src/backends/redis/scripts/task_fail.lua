-- Record a failed attempt of run ARGV[2] of task KEYS[1] (id ARGV[1]), only while it is pending at that
-- run. KEYS[2] is the due zset, KEYS[3] the dead-letter zset. ARGV[3] the error, ARGV[4] what follows:
-- 'retry' (due again at ARGV[5], attempts + 1), 'next' (recurring job skips to the period due at ARGV[5],
-- attempts reset) or 'dead' (out of the due set into the dead letters, scored by ARGV[5] = now).
-- Returns 1 when recorded.
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then
  return 0
end
if tonumber(redis.call('HGET', KEYS[1], 'completions')) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'last_error', ARGV[3])
if ARGV[4] == 'retry' then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'due_ms', ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
elseif ARGV[4] == 'next' then
  redis.call('HSET', KEYS[1], 'attempts', 0, 'due_ms', ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'status', 'dead')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
end
return 1

-- Complete run ARGV[2] of task KEYS[1] (id ARGV[1]) exactly once: only while it is pending with that
-- many completions. ARGV[3] is the next due time in ms for a recurring task, or -1 for a one-shot task.
-- Returns 1 when this call completed it, 0 when it was already completed (by this run or another).
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then
  return 0
end
if tonumber(redis.call('HGET', KEYS[1], 'completions')) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'completions', 1)
redis.call('HSET', KEYS[1], 'attempts', 0)
if tonumber(ARGV[3]) < 0 then
  redis.call('HSET', KEYS[1], 'status', 'done')
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'due_ms', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 1

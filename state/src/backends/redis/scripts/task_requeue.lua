-- Move the dead-lettered task KEYS[1] (id ARGV[1]) back to the due zset KEYS[2] at ARGV[2], attempts
-- reset, out of the dead-letter zset KEYS[3]. Returns 1 when it was dead-lettered.
if redis.call('HGET', KEYS[1], 'status') ~= 'dead' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'pending', 'attempts', 0, 'due_ms', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1

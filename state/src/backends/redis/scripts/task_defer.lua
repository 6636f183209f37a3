-- Defer run ARGV[2] of task KEYS[1] (id ARGV[1]) to ARGV[3] ms (a claimed task's visibility timeout):
-- only while it is pending with that many completions. Returns 1 when deferred, 0 otherwise.
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then
  return 0
end
if tonumber(redis.call('HGET', KEYS[1], 'completions')) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'due_ms', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1

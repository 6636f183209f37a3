-- Create task KEYS[1] (hash) if missing and index it in KEYS[2] (due zset) under ARGV[1] (id).
-- ARGV[2] payload, ARGV[3] every_ms (0 = one-shot), ARGV[4] due_ms. Returns 1 when created.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'payload', ARGV[2], 'status', 'pending', 'every_ms', ARGV[3],
           'due_ms', ARGV[4], 'completions', 0)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1

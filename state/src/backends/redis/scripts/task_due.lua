-- Due tasks: up to ARGV[2] ids of KEYS[1] (the due set) due at ARGV[1] ms, earliest first, each with
-- its record's fields (the task hashes are ARGV[3] .. id). One call instead of one per task.
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
local listed = {}
for i, id in ipairs(ids) do
  listed[i] = {id, redis.call('HMGET', ARGV[3] .. id, 'payload', 'status', 'every_ms', 'due_ms',
    'completions', 'attempts', 'last_error')}
end
return listed

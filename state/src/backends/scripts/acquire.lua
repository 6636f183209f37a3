-- Acquire a lease: the atomic equivalent of `SET lock value NX PX ttl` plus the fencing counter.
-- KEYS[1] lease key: a string "<owner>:<fence>:<acquired_ms>" that expires with the lease
-- KEYS[2] fencing counter (no TTL: it must outlive every lease so tokens never repeat)
-- ARGV[1] owner value, ARGV[2] ttl in ms, ARGV[3] the client's wall-clock time in ms (informational)
-- Returns the fencing token when granted, nil when held. Three commands: kept lean, since every
-- Redlock pair runs it on every node.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fence .. ':' .. ARGV[3], 'PX', ARGV[2])
return fence

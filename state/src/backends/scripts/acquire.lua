-- Acquire a lease: the Redis equivalent of `SET lock owner NX PX ttl` plus the fencing counter, atomically.
-- KEYS[1] lock hash (owner, fence, acquired_ms; expires with the lease)
-- KEYS[2] fencing counter (no TTL: it must outlive every lease so tokens never repeat)
-- ARGV[1] owner value, ARGV[2] ttl in ms
-- Returns {fence, server_now_ms} when granted, nil when held.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local fence = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'fence', fence, 'acquired_ms', now_ms)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {fence, now_ms}

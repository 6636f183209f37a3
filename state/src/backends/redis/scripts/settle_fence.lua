-- Redlock repair after a quorum granted with differing counters: raise the fencing counter KEYS[2] to
-- ARGV[2], never lowering it, only while the caller still holds the lease KEYS[1] (its value is ARGV[1]).
-- Returns the counter afterwards, or -1 when the lease is not the caller's.
-- Only the lease holder may move a node's counter (the acquire script increments it only when it
-- grants), so the counters of the nodes an attempt holds are its own until it releases them: the token
-- it settles on them is entered by it alone, and the next holder of any of them increments past it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local wanted = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current < wanted then
  redis.call('SET', KEYS[2], ARGV[2])
  return wanted
end
return current

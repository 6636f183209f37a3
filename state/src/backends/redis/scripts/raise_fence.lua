-- Redlock repair after a quorum granted with differing counters: raise the fencing counter KEYS[1] to at
-- least ARGV[1], never lowering it. Returns the counter afterwards. The caller needs a majority of nodes
-- at >= ARGV[1] before it hands out token ARGV[1], so the next quorum (which overlaps this one) issues a
-- larger token.
local wanted = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < wanted then
  redis.call('SET', KEYS[1], ARGV[1])
  return wanted
end
return current

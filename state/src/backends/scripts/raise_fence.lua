-- Redlock repair after a quorum granted with differing counters: raise the fencing counter KEYS[1] to at
-- least ARGV[1] (never lowering it), and record ARGV[1] as the fence of the lease KEYS[2] if ARGV[2] still
-- owns it (keeping its TTL). Returns the counter afterwards; the caller needs a majority of nodes at
-- >= ARGV[1] before it hands out token ARGV[1], so the next quorum (which overlaps this one) issues a
-- larger token.
local wanted = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < wanted then
  redis.call('SET', KEYS[1], ARGV[1])
  current = wanted
end
local lease = redis.call('GET', KEYS[2])
if lease and string.sub(lease, 1, #ARGV[2] + 1) == ARGV[2] .. ':' then
  local acquired = string.match(lease, ':[^:]*:([^:]*)$')
  redis.call('SET', KEYS[2], ARGV[2] .. ':' .. ARGV[1] .. ':' .. acquired, 'KEEPTTL')
end
return current

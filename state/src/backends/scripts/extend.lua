-- Compare-and-PEXPIRE: reset the lease in KEYS[1] to ARGV[2] ms from now, only if ARGV[1] still owns it.
-- Returns 1 when extended, 0 when the lease is gone or owned by someone else.
local lease = redis.call('GET', KEYS[1])
if lease and string.sub(lease, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0

-- Compare-and-delete: release only if ARGV[1] still owns the lease in KEYS[1].
-- Returns 1 when released, 0 when the lease is gone or owned by someone else.
local lease = redis.call('GET', KEYS[1])
if lease and string.sub(lease, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  return redis.call('DEL', KEYS[1])
end
return 0

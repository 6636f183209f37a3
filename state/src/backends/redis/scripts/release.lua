-- Compare-and-delete: release only if the lease in KEYS[1] is still exactly ARGV[1] (the holder's lease value).
-- Returns 1 when released, 0 when the lease is gone or owned by someone else.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0

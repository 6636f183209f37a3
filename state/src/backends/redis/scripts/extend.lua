-- Compare-and-PEXPIRE: reset the lease in KEYS[1] to ARGV[2] ms from now, only if it is still exactly
-- ARGV[1] (the holder's lease value). Returns 1 when extended, 0 when the lease is gone or owned by
-- someone else.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0

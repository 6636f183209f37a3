-- Acquire a lease: `SET lock value NX PX ttl` plus the fencing counter, atomically, in two commands
-- (every Redlock pair runs this on every node, so it is kept lean: no string work in the script).
-- KEYS[1] lease key: the lease value "<owner secret>:<acquired_ms>", expiring with the lease
-- KEYS[2] fencing counter (no TTL: it must outlive every lease so tokens never repeat). While a lease
--         exists nobody else can increment it, so its value is the holder's fencing token.
-- ARGV[1] lease value, ARGV[2] ttl in ms
-- Returns the fencing token when granted, nil when held.
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('INCR', KEYS[2])

-- Renew: ARGV 1 member, 2 holder, 3 ttl ms. 1 when renewed, 0 when the entry is gone or another's.
if holder_of(ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
return 1

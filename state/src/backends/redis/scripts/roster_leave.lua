-- Leave: ARGV 1 member, 2 holder. 1 when removed, 0 when the entry is gone or another's.
if holder_of(ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1

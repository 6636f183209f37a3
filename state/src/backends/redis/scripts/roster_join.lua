-- Join: ARGV 1 member, 2 holder, 3 record, 4 ttl ms, 5 lowest token to hand out (Redlock's majority).
-- Returns {1, token} when joined, {0, 0} when a live entry has the name.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, 0}
end
local token = redis.call('INCR', KEYS[3])
local at_least = tonumber(ARGV[5])
if token < at_least then
  token = at_least
  redis.call('SET', KEYS[3], token)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], token .. ':' .. ARGV[2] .. ':' .. ARGV[3])
return {1, token}

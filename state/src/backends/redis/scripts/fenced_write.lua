-- Fenced write: store ARGV[2] under KEYS[1] only if token ARGV[1] is >= the highest token seen for it.
-- The key is a hash {token, value}. Returns {1, token} when written, {0, highest} when rejected.
local highest = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
local token = tonumber(ARGV[1])
if token < highest then
  return {0, highest}
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
return {1, token}

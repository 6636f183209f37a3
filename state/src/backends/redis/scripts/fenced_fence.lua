-- Fence: raise the highest token of KEYS[1] to ARGV[1] unless a higher one was accepted, and return the
-- current value. The key is a hash {token, value} (value absent until the first write).
-- Returns {1, value} (or {1} without a value) when fenced, {0, highest} when refused.
local highest = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
local token = tonumber(ARGV[1])
if token < highest then
  return {0, highest}
end
redis.call('HSET', KEYS[1], 'token', ARGV[1])
local value = redis.call('HGET', KEYS[1], 'value')
if value then
  return {1, value}
end
return {1}

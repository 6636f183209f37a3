-- Who holds KEYS[1] (lease) with which token (KEYS[2], the fencing counter):
-- {"<owner>:<acquired_ms>", fence, remaining_ms, server_now_ms}, or nil when free.
local lease = redis.call('GET', KEYS[1])
if not lease then
  return false
end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
local t = redis.call('TIME')
return {lease, fence, redis.call('PTTL', KEYS[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}

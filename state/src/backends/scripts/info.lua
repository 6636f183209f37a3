-- Who holds KEYS[1]: {owner, fence, acquired_ms, remaining_ms, server_now_ms}, or nil when free.
local v = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'acquired_ms')
if not v[1] then
  return false
end
local pttl = redis.call('PTTL', KEYS[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {v[1], tonumber(v[2]), tonumber(v[3]), pttl, now_ms}

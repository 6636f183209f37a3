-- Who holds KEYS[1]: {"<owner>:<fence>:<acquired_ms>", remaining_ms, server_now_ms}, or nil when free.
local lease = redis.call('GET', KEYS[1])
if not lease then
  return false
end
local t = redis.call('TIME')
return {lease, redis.call('PTTL', KEYS[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}

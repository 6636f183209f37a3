-- Shared by the roster scripts. KEYS: 1 deadlines (sorted set: member -> lease end, ms of the server's
-- clock), 2 entries (hash: member -> "token:holder:record"), 3 the roster's token counter.
-- Liveness is decided here, on the server's clock: every script first drops the members whose lease
-- ended, so nothing after this line ever sees one.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
while #expired > 0 do
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
  expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
end
-- The holder of a live member's entry, or nil.
local function holder_of(member)
  local entry = redis.call('HGET', KEYS[2], member)
  if not entry then
    return nil
  end
  return string.match(entry, '^%d+:([^:]*):')
end

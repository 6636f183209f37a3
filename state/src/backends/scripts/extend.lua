-- Compare-and-PEXPIRE: reset the lease in KEYS[1] to ARGV[2] ms from now, only if ARGV[1] still owns it.
-- Returns the server time in ms when extended, nil when the lease is gone or owned by someone else.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return false
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

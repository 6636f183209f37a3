-- Read: ARGV 1 'version' -> {live members, last token handed out}; 'members' -> {names, holders, tokens,
-- records}, in lease order.
if ARGV[1] == 'version' then
  return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[5]) or '0')}
end
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
local holders, tokens, records = {}, {}, {}
for i, name in ipairs(names) do
  holders[i] = redis.call('HGET', KEYS[2], name) or ''
  tokens[i] = tonumber(redis.call('HGET', KEYS[4], name) or '0')
  records[i] = redis.call('HGET', KEYS[3], name) or ''
end
return {names, holders, tokens, records}

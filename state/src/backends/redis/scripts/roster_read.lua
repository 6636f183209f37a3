-- Read: ARGV 1 'version' -> {live members, last token handed out}; 'members' -> the entries hash
-- (member, "token:holder:record", ...), every one live after the prelude.
if ARGV[1] == 'version' then
  return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}
end
return redis.call('HGETALL', KEYS[2])

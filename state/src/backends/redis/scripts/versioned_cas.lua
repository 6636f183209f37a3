-- Atomic multi-key compare-and-set. For each i: KEYS[i] is a hash {version, value}; ARGV[2i-1] is the
-- expected version (0 = the key must not exist), ARGV[2i] the new value. All or nothing: returns 1 and
-- bumps every version when all expectations hold, 0 (changing nothing) otherwise.
for i, key in ipairs(KEYS) do
  local current = tonumber(redis.call('HGET', key, 'version') or '0')
  if current ~= tonumber(ARGV[2 * i - 1]) then
    return 0
  end
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'version', tonumber(ARGV[2 * i - 1]) + 1, 'value', ARGV[2 * i])
end
return 1

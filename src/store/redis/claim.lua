-- CLAIM: one round trip for every claim. Inserts the given brand-new record if the key is
-- absent (SET NX semantics) and returns 1, or returns the record that is there (HGETALL,
-- packed into one string; empty when absent and nothing was given) for idem to decide on.
-- KEYS: record, created index, expiry index
-- ARGV: (nothing, to only read) or pttl, due, member, field/value pairs...
local current = redis.call('HGETALL', KEYS[1])
if #current > 0 or #ARGV == 0 then
  return packed(current)
end
store(KEYS[1], KEYS[2], KEYS[3], 1, 4, ARGV[1], ARGV[2], ARGV[3])
return 1

-- WRITE: compare-and-set of a whole record. Writes it only if the record still has the
-- version idem decided on, and returns 1; otherwise returns the record as it is now
-- (HGETALL, empty when gone) so idem can decide again without another read.
-- KEYS: record, created index, expiry index
-- ARGV: expected version, pttl, due, member, field/value pairs...
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[1] then
  return redis.call('HGETALL', KEYS[1])
end
-- A record claimed anew after expiry has a new created_at, hence a new member.
local old = redis.call('HGET', KEYS[1], 'ix')
if old and old ~= ARGV[4] then
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZREM', KEYS[3], old)
end
store(KEYS[1], KEYS[2], KEYS[3], int(tonumber(v) + 1), 5, ARGV[2], ARGV[3], ARGV[4])
return 1

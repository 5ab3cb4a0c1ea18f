-- FENCED: renew and finish. Changes the record only while it is in_progress under the
-- caller's lease token (fencing: a stale owner can never write) and returns 1, else 0:
-- the Lua twin of Record::is_owned_by, checked against it by the conformance rule tests.
-- Redis may keep the record longer than needed (decide() still sees it expired), never
-- shorter: its time to live only grows, by as much as the deadline moved.
-- KEYS: record, created index, expiry index
-- ARGV: token, n, n field names to remove, field/value pairs to set...
local f = redis.call('HMGET', KEYS[1], 'st', 'tok', 'lu', 'ea', 'ix')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[1] then
  return 0
end
local before = deadline(f[1], f[3], f[4])
local n = tonumber(ARGV[2])
if n > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 3, 2 + n))
end
if #ARGV > 2 + n then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3 + n))
end
redis.call('HINCRBY', KEYS[1], 'v', 1)
local g = redis.call('HMGET', KEYS[1], 'st', 'lu', 'ea')
local after = deadline(g[1], g[2], g[3])
if after > before then
  local pttl = redis.call('PTTL', KEYS[1]) + after - before
  keep_until(KEYS[1], pttl)
  keep_until(KEYS[2], pttl)
  keep_until(KEYS[3], pttl)
end
redis.call('ZADD', KEYS[3], int(after), f[5])
return 1

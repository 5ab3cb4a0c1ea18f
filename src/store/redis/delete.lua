-- DELETE: forgets a record and its index entries. Returns 1, or 0 when it was absent.
-- KEYS: record, created index, expiry index
local member = redis.call('HGET', KEYS[1], 'ix')
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
if member then
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
return 1

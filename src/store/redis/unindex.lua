-- UNINDEX: removes index entries whose record is gone (Redis expired it) or was claimed
-- anew under another member; an entry whose record is back meanwhile is kept.
-- KEYS: created index, expiry index, then the record key of each member
-- ARGV: the members
for i, member in ipairs(ARGV) do
  if redis.call('HGET', KEYS[i + 2], 'ix') ~= member then
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
  end
end
return 0

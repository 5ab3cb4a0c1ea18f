-- PURGE: removes index entries that are due (their record's deadline has passed) and the
-- record itself if Redis has not dropped it yet. Re-checks each entry, since a record can
-- be claimed again between idem's read of the expiry index and this script. Returns how
-- many entries it removed.
-- KEYS: created index, expiry index, then the record key of each member
-- ARGV: now, then the members
local now = tonumber(ARGV[1])
local removed = 0
for i = 2, #ARGV do
  local member = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[2], member)
  if due and tonumber(due) <= now then
    if redis.call('HGET', KEYS[i + 1], 'ix') == member then
      redis.call('DEL', KEYS[i + 1])
    end
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
    removed = removed + 1
  end
end
return removed

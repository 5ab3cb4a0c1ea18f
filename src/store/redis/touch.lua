-- TOUCH: adds summed replay counts (store/touch.rs) to records that still exist. Bumps the
-- version, so a compare-and-set decided before the touch retries instead of losing it.
-- KEYS: the records
-- ARGV: replays, last_seen_at for each record
for i, rec in ipairs(KEYS) do
  if redis.call('EXISTS', rec) == 1 then
    redis.call('HINCRBY', rec, 'rc', ARGV[2 * i - 1])
    local seen = tonumber(redis.call('HGET', rec, 'ls'))
    if not seen or seen < tonumber(ARGV[2 * i]) then
      redis.call('HSET', rec, 'ls', ARGV[2 * i])
    end
    redis.call('HINCRBY', rec, 'v', 1)
  end
end
return 0

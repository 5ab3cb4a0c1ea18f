-- Helpers prepended to every idem script (see scripts.rs). Times are milliseconds; they
-- are written back with int() because Redis may print a large Lua number as 1.7e+12.

local function int(n)
  return string.format('%.0f', n)
end

-- Extends a key's time to live to at least `pttl` ms, never shortening it. The indexes
-- live as long as their longest-lived record, so an abandoned prefix cleans itself up.
local function keep_until(key, pttl)
  if redis.call('PTTL', key) < pttl then
    redis.call('PEXPIRE', key, int(pttl))
  end
end

-- The instant after which a record may be forgotten: its expiry, or the end of a live
-- lease if later. The Lua twin of Record::deadline in the core, checked against it by the
-- conformance rule tests.
local function deadline(status, locked_until, expires_at)
  local d = tonumber(expires_at)
  if status == 'in_progress' and locked_until then
    d = math.max(d, tonumber(locked_until))
  end
  return d
end

-- Makes `rec` hold exactly version `v` and the field/value pairs ARGV[first..], expiring
-- after `pttl` ms, and indexes it under `member` due at `due`.
local function store(rec, created, expires, v, first, pttl, due, member)
  redis.call('DEL', rec)
  redis.call('HSET', rec, 'v', v, unpack(ARGV, first))
  redis.call('PEXPIRE', rec, pttl)
  redis.call('ZADD', created, 0, member)
  redis.call('ZADD', expires, due, member)
  keep_until(created, tonumber(pttl))
  keep_until(expires, tonumber(pttl))
end

-- A hash's HGETALL reply as one string: each field and value as its length in decimal,
-- ':' and its bytes. The client parses one bulk string far faster than 2n of them
-- (codec.rs `unpack` reads it back).
local function packed(flat)
  local parts = {}
  for i, s in ipairs(flat) do
    parts[i] = #s .. ':' .. s
  end
  return table.concat(parts)
end

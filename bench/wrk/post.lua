-- wrk script for bench/gateway.sh: POSTs a small JSON body and prints one
-- machine-readable line when the run ends.
--
--   wrk ... -s post.lua URL -- MODE PREFIX_OR_KEY BODY [CHECK_STATUS]
--
-- MODE unique: every request carries `Idempotency-Key: PREFIX-<thread>-<n>`, a key no
--              other request (in this or any other run) uses: the gateway's miss path.
-- MODE fixed:  every request carries `Idempotency-Key: KEY`: the replay path.
-- MODE none:   no Idempotency-Key at all: the gateway passes the request through.
-- Either way each request also carries a unique `X-Bench-Seq`, and every scenario builds
-- its requests the same way (in Lua, per request), so wrk spends the same CPU per request
-- in every row; on a 2-core machine that matters. The upstream and the bare proxy get
-- the same headers (unique keys) and simply ignore them.
--
-- CHECK_STATUS (a number, e.g. 201) makes every response with another status count as
-- a failure. It costs wrk a Lua callback per response, so every row pays it alike.
-- wrk itself only counts statuses >= 400 (summary.errors.status).

local threads = {}

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   mode = args[1] or "unique"
   local tag = args[2] or tostring(os.time())
   body = args[3] or '{"amount":42}'
   expect = tonumber(args[4] or "0") or 0
   prefix = tag .. "-" .. tostring(tid) .. "-"
   fixed_key = tag
   seq = 0
   ok_count = 0
   bad_count = 0
   first_bad = 0
   wrk.method = "POST"
   wrk.body = body
   wrk.headers["Content-Type"] = "application/json"
   if expect ~= 0 then
      response = check
   end
end

function request()
   seq = seq + 1
   local id = prefix .. seq
   if mode == "fixed" then
      wrk.headers["Idempotency-Key"] = fixed_key
   elseif mode == "none" then
      wrk.headers["Idempotency-Key"] = nil
   else
      wrk.headers["Idempotency-Key"] = id
   end
   wrk.headers["X-Bench-Seq"] = id
   return wrk.format()
end

function check(status, headers, body)
   if status == expect then
      ok_count = ok_count + 1
   else
      bad_count = bad_count + 1
      if first_bad == 0 then
         first_bad = status
      end
   end
end

function done(summary, latency, requests)
   local bad, first = 0, 0
   for _, thread in ipairs(threads) do
      bad = bad + (thread:get("bad_count") or 0)
      local f = thread:get("first_bad") or 0
      if first == 0 then
         first = f
      end
   end
   local e = summary.errors
   local seconds = summary.duration / 1e6
   local mean = latency.mean
   if mean ~= mean then -- NaN: no request completed
      mean = 0
   end
   io.write(string.format(
      "BENCH requests=%d duration_us=%d rps=%.1f mean_us=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
      "connect_err=%d read_err=%d write_err=%d timeout_err=%d status_err=%d unexpected_status=%d first_unexpected=%d\n",
      summary.requests, summary.duration, summary.requests / seconds, mean,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status, bad, first))
end

-- wrk script of benchmarks/bench_service.py: POST one path, each request's JSON body a random line of a file, and
-- print the run as one JSON line (prefixed "wrk-json ") after wrk's own report.
--
--   wrk -t1 -c4 -d20s --latency -s benchmarks/wrk_post.lua http://127.0.0.1:3000 -- /recommend bodies.jsonl [RATE]
--
-- RATE (requests/s of one wrk thread; the benchmark runs -t1) paces the requests to an even schedule shared by the
-- thread's connections: a request is held until its slot. wrk is closed-loop (wrk2 is not packaged here): a slot
-- that has passed while every connection waited for an answer is not made up, so when the service falls behind
-- the achieved rate drops below RATE instead of a queue building up, and latency is counted from the send, not
-- from the slot.

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } timespec;
  int clock_gettime(int clk_id, timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local now_buffer = ffi.new("timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_buffer)
  return tonumber(now_buffer.tv_sec) * 1000 + tonumber(now_buffer.tv_nsec) / 1e6
end

local path, bodies, interval_ms, slot = "/", {}, 0, nil
local headers = { ["Content-Type"] = "application/json" }
function init(args)
  path = args[1]
  for line in io.lines(args[2]) do
    bodies[#bodies + 1] = line
  end
  if #bodies == 0 then
    error("no request bodies in " .. args[2])
  end
  local rate = tonumber(args[3] or "0")
  if rate > 0 then
    interval_ms = 1000 / rate
  end
  math.randomseed(os.time())
end

function delay()
  if interval_ms == 0 then
    return 0
  end
  local now = now_ms()
  slot = math.max(slot and slot + interval_ms or now, now)
  return slot - now
end

function request()
  return wrk.format("POST", path, headers, bodies[math.random(#bodies)])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(
    string.format(
      'wrk-json {"requests": %d, "duration_s": %.3f, "errors": {"connect": %d, "read": %d, "write": %d, '
        .. '"status": %d, "timeout": %d}, "latency_ms": {"p50": %.3f, "p90": %.3f, "p99": %.3f, "p999": %.3f, '
        .. '"max": %.3f, "mean": %.3f}}\n',
      summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
      latency:percentile(99.9) / 1000, latency.max / 1000, latency.mean / 1000
    )
  )
end

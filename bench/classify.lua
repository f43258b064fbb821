-- wrk script: POST the body in $BENCH_BODY (a JSON file) to /v1/classify, each request with the next key of
-- $BENCH_KEYS (one key a line), count the answers by status, and sum the stages of each 200's Server-Timing
-- header into $BENCH_STAGES (one "name total_ms" line per stage, plus "status <code> <count>" lines and
-- "timed <count>").
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   stages = {}
   statuses = {}
   timed = 0
end

local file = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
local body = file:read("*a")
file:close()
local keys = {}
for line in io.lines(os.getenv("BENCH_KEYS")) do
   table.insert(keys, line)
end
local next_key = 0

function request()
   next_key = next_key % #keys + 1
   return wrk.format("POST", nil, {["Content-Type"] = "application/json",
                                   ["Authorization"] = "Bearer " .. keys[next_key]}, body)
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   local timing = headers["server-timing"] or headers["Server-Timing"]
   if status == 200 and timing then
      timed = timed + 1
      for name, ms in string.gmatch(timing, "([%w-]+);dur=([%d.]+)") do
         stages[name] = (stages[name] or 0) + tonumber(ms)
      end
   end
end

function done(summary, latency, requests)
   local out = assert(io.open(os.getenv("BENCH_STAGES"), "w"))
   for _, thread in ipairs(threads) do
      for name, ms in pairs(thread:get("stages")) do
         out:write(name, " ", ms, "\n")
      end
      for status, count in pairs(thread:get("statuses")) do
         out:write("status ", status, " ", count, "\n")
      end
      out:write("timed ", thread:get("timed"), "\n")
   end
   out:close()
end

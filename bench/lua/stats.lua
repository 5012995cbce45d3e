-- Shared by every bench script (bench/wrk.py prepends it): counts responses per HTTP status
-- in each thread, keeps the first non-2xx answer as a sample, and prints one summary line,
-- "@@BENCH {json}", that bench/wrk.py parses (latencies in microseconds).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)  -- 1-based; bench/wrk.py runs at most 16 threads
end

-- The script's own arguments (after "--") as a 1-based list. wrk hands init() every argument
-- from the URL on, numbered from 0: the URL and a literal "--" are skipped.
function script_args(args)
  local out, i = {}, 0
  while args[i] ~= nil do
    local a = args[i]
    if a ~= "--" and not string.match(a, "^https?://") then out[#out + 1] = a end
    i = i + 1
  end
  return out
end

statuses = {}
error_sample = nil

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if (status < 200 or status > 299) and error_sample == nil then
    error_sample = tostring(status) .. " " .. string.sub(body or "", 1, 400)
  end
end

function done(summary, latency, requests)
  local merged, sample = {}, nil
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    if counts then
      for code, n in pairs(counts) do merged[code] = (merged[code] or 0) + n end
    end
    local s = thread:get("error_sample")
    if s and sample == nil then sample = s end
  end
  local parts = {}
  for code, n in pairs(merged) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    '@@BENCH {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ",")))
  if sample then
    local flat = string.gsub(sample, "[\r\n]+", " ")
    io.write("@@SAMPLE ", flat, "\n")
  end
end

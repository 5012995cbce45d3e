-- $book every line of a plan file once ("Slot/1 Patient/2 ServiceRequest/3": slot, patient,
-- active upward referral), at as many connections as wrk keeps open (run with -t1: one Lua
-- state hands the lines out, so no slot is asked for twice). When every booking has been
-- answered it writes DONE_FILE and stops the thread; bench/booking.py times the run to that
-- file and then interrupts wrk (whose own clock runs to -d).
-- Usage: wrk -t1 -s book.lua URL -- PLAN_FILE DONE_FILE ORGANIZATION
--
-- wrk calls request() once before the run to check the script: so that this call costs no
-- booking, the plan starts with a line "-", which asks for a filler (GET /healthz).

local plan, done_file = {}, nil
local issued, answered, bookings = 0, 0, 0
local count_status = response  -- stats.lua's: statuses of the bookings only

local BODY = '{"resourceType":"Parameters","parameter":[' ..
  '{"name":"slot","valueReference":{"reference":"%s"}},' ..
  '{"name":"patient","valueReference":{"reference":"%s"}},' ..
  '{"name":"referral","valueReference":{"reference":"%s"}}]}'

function init(args)
  local a = script_args(args)
  for line in io.lines(a[1]) do
    if line ~= "" then plan[#plan + 1] = line end
    if line ~= "" and line ~= "-" then bookings = bookings + 1 end
  end
  done_file = a[2]
  wrk.headers["Content-Type"] = "application/fhir+json"
  wrk.headers["Accept"] = "application/fhir+json"
  wrk.headers["X-Yilian-Organization"] = a[3]
end

-- A connection asks for its next request after a response: once every line is out, it waits
-- (a minute, longer than the rest of the run) instead of sending anything else.
function delay()
  if issued >= #plan then return 60000 end
  return 0
end

function request()
  if issued >= #plan then
    -- only a connection's first request skips delay(): a filler that does not book
    return wrk.format("GET", "/healthz")
  end
  issued = issued + 1
  if plan[issued] == "-" then return wrk.format("GET", "/healthz") end
  local slot, patient, referral = string.match(plan[issued], "^(%S+) (%S+) (%S+)$")
  return wrk.format("POST", wrk.path .. "/Appointment/$book", nil, string.format(BODY, slot, patient, referral))
end

function response(status, headers, body)
  if string.sub(body or "", 1, 15) == '{"status":"ok"}' then return end
  count_status(status, headers, body)
  answered = answered + 1
  if answered == bookings then
    local file = assert(io.open(done_file, "w"))
    file:write(tostring(answered))
    file:close()
    wrk.thread:stop()
  end
end

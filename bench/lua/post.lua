-- Send a JSON body built from a template: each "@@RID:male@@" / "@@RID:female@@" becomes a
-- fresh 18-character resident ID (GB 11643, valid check character, area 110105, the order
-- code's parity matching the sex), unique across requests and threads; each "@@BIRTH@@"
-- becomes the birth date (YYYY-MM-DD) of the resident ID filled just before it.
-- Usage: wrk -s post.lua URL -- METHOD PATH TEMPLATE_FILE

local method, path, template
local WEIGHTS = {7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2}
local CHECK = "10X98765432"
local AREA = "110105"
local FIRST_DAY = os.time({year = 1940, month = 1, day = 1, hour = 12})
local DAYS = 20000
local counter = 0
local last_birth = nil

local function resident_id(sex)
  counter = counter + 1
  local n = counter * 16 + tid  -- tid is 1..16: no two threads share an n
  local k = math.floor(n / DAYS) % 499
  local order = (sex == "male") and (2 * k + 1) or (2 * k + 2)
  local day = FIRST_DAY + (n % DAYS) * 86400
  last_birth = os.date("!%Y-%m-%d", day)
  local first17 = AREA .. os.date("!%Y%m%d", day) .. string.format("%03d", order)
  local sum = 0
  for i = 1, 17 do sum = sum + (string.byte(first17, i) - 48) * WEIGHTS[i] end
  local c = sum % 11 + 1
  return first17 .. string.sub(CHECK, c, c)
end

function init(args)
  local a = script_args(args)
  method, path = a[1], a[2]
  local file = assert(io.open(a[3], "rb"))
  template = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/fhir+json"
  wrk.headers["Accept"] = "application/fhir+json"
end

local function fill(placeholder)
  if placeholder == "BIRTH" then return last_birth end
  return resident_id(string.match(placeholder, "^RID:(%a+)$"))
end

function request()
  local body = string.gsub(template, "@@([%w:]+)@@", fill)
  return wrk.format(method, path, nil, body)
end

-- GET a path drawn at random from a file of paths (one per line, already URL-encoded).
-- Usage: wrk -s get.lua URL -- PATHS_FILE

local paths = {}

function init(args)
  local file_name = script_args(args)[1]
  local file = assert(io.open(file_name, "r"))
  for line in file:lines() do
    if #line > 0 then paths[#paths + 1] = line end
  end
  file:close()
  assert(#paths > 0, "no paths in " .. file_name)
  math.randomseed(7919 * tid)  -- deterministic per thread
  wrk.headers["Accept"] = "application/fhir+json"
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end

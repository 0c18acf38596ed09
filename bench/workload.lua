-- wrk script for the DailyPlay benchmark. BENCH_MODE picks the workload:
--   bare-get, bare-post, create, validate, consume, mixed (create:validate:consume = 1:2:1),
--   create-keyed (create with a new Idempotency-Key on every request, as the Python client does).
-- Session tokens come from BENCH_TOKENS (one per line); each wrk thread takes its own slice, so
-- every validate/consume request names a distinct fresh token.
local mode = os.getenv("BENCH_MODE")
local key = os.getenv("BENCH_KEY") or ""
local tokens_path = os.getenv("BENCH_TOKENS")
local thread_count = tonumber(os.getenv("BENCH_THREADS") or "1")
local api = "/api/org-api-keys"
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  tokens = {}
  position = 0
  counter = 0
  if tokens_path then
    local n = 0
    for line in io.lines(tokens_path) do
      if n % thread_count == id then
        tokens[#tokens + 1] = line
      end
      n = n + 1
    end
  end
end

local function next_token()
  position = position + 1
  if position > #tokens then
    position = 1 -- ran out: reuse (validate stays 200; consume turns 410, which is counted)
  end
  return tokens[position]
end

local create_body = '{"game_id": 42, "external_ref": "bench"}'

local function create()
  return wrk.format("POST", api .. "?action=create-session",
    {["x-api-key"] = key, ["content-type"] = "application/json"}, create_body)
end

-- Keys unique across threads and runs: the run's start second, the thread, the request.
local run_nonce = tostring(os.time())

local function create_keyed()
  return wrk.format("POST", api .. "?action=create-session",
    {["x-api-key"] = key, ["content-type"] = "application/json",
     ["idempotency-key"] = run_nonce .. "-" .. id .. "-" .. counter}, create_body)
end

local function validate()
  return wrk.format("GET", api .. "?action=validate-session&token=" .. next_token())
end

local function consume()
  return wrk.format("POST", api .. "?action=consume-session",
    {["content-type"] = "application/json"}, '{"token": "' .. next_token() .. '"}')
end

function request()
  counter = counter + 1
  if mode == "bare-get" then
    return wrk.format("GET", "/bare")
  elseif mode == "bare-post" then
    return wrk.format("POST", "/bare", {["content-type"] = "application/json"}, create_body)
  elseif mode == "create" then
    return create()
  elseif mode == "create-keyed" then
    return create_keyed()
  elseif mode == "validate" then
    return validate()
  elseif mode == "consume" then
    return consume()
  else
    local step = counter % 4
    if step == 0 then return create() elseif step == 3 then return consume() end
    return validate()
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end

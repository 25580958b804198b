-- wrk script used for every benchmark run (benchmarks/run.py passes it with -s).
--
-- WRK_UPLOAD_BYTES > 0 turns each request into a POST of that many bytes (the upload scenario).
-- done() prints one machine-readable line, so run.py needs no parsing of wrk's text table.

local upload = tonumber(os.getenv("WRK_UPLOAD_BYTES") or "0")
if upload > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("u", upload)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end

-- For bench/pixel/run.py: one machine-readable line with wrk's exact percentiles (its
-- histogram has microsecond resolution), instead of parsing the rounded --latency table.
-- WRK_DELAY_MS (set by run.py --rate) paces each connection, for latency below saturation.
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
if delay_ms then
  delay = function()
    return delay_ms
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, '
      .. '"p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end

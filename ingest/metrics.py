"""Prometheus metrics of the edge (pixel, intake API, publishing and the spool)."""

from prometheus_client import Counter, Gauge, Histogram

PIXEL_LOADS = Counter(
    "opentrack_pixel_loads_total",
    "Pixel requests by outcome (counted, invalid_token, not_get)",
    ["outcome"],
)
API_REQUESTS = Counter(
    "opentrack_api_requests_total", "API requests by route and status", ["route", "status"]
)
PUBLISH_SECONDS = Histogram(
    "opentrack_publish_seconds",
    "Time to hand one event to the producer (spool write included)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
PUBLISH_ERRORS = Counter(
    "opentrack_producer_errors_total",
    "Producer failures by stage (connect, send, delivery, resend; lost: no spool copy, no Kafka)",
    ["stage"],
)
SPOOL_BYTES = Gauge("opentrack_spool_bytes", "Bytes in the local spool", multiprocess_mode="max")
SPOOL_SEGMENTS = Gauge("opentrack_spool_segments", "Spool files not yet delivered",
                       multiprocess_mode="max")
SPOOL_FULL = Counter("opentrack_spool_full_total", "Events that found the spool full")

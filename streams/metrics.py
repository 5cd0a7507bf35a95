"""Prometheus metrics of the stream worker."""

from prometheus_client import Counter, Gauge, Histogram

WORKER_EVENTS = Counter(
    "opentrack_worker_events_total",
    "Events the worker consumed, by topic and outcome (applied, replay, parked, invalid)",
    ["topic", "outcome"],
)
WORKER_LOADS = Counter(
    "opentrack_worker_loads_total",
    "Pixel loads the worker decided, by class and whether dedup counted them",
    ["load_class", "counted"],
)
WORKER_PROCESSING_SECONDS = Histogram(
    "opentrack_worker_processing_seconds",
    "From a load's arrival at the pixel to the worker's verdict on it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
WORKER_CONSUMER_LAG = Gauge(
    "opentrack_worker_consumer_lag",
    "Messages in a partition the worker has not read yet (high watermark - position)",
    ["topic", "partition"],
)
REPLAY_RECLASSIFIED = Counter(
    "opentrack_replay_reclassified_total",
    "Known loads whose class a replay with the current rules changed",
)
WORKER_SKIPPED_OFFSETS = Counter(
    "opentrack_worker_skipped_offsets_total",
    "Offsets of an input partition the worker never received between two it did, within one "
    "consumer generation (compaction of emails.sent makes some; anything else is a loss)",
    ["topic"],
)

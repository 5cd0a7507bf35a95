"""Prometheus metrics of the stream worker."""

from prometheus_client import Counter

WORKER_EVENTS = Counter(
    "opentrack_worker_events_total",
    "Events the worker consumed, by topic and outcome (applied, replay, parked, invalid)",
    ["topic", "outcome"],
)

"""Prometheus metrics of the stream worker."""

from prometheus_client import Counter

WORKER_EVENTS = Counter(
    "opentrack_worker_events_total",
    "Events the worker consumed, by topic and outcome (applied, replay, parked, invalid)",
    ["topic", "outcome"],
)
REPLAY_RECLASSIFIED = Counter(
    "opentrack_replay_reclassified_total",
    "Known loads whose class a replay with the current rules changed",
)

"""The pipeline's topics, created up front with the same partition count (co-partitioned by
``email_id``) and with the retention that makes a replay from the beginning possible."""

from __future__ import annotations

import contextlib
import logging

from opentrack import events

log = logging.getLogger(__name__)

FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000"}

TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    # The raw streams are the source of truth for replays and rebuilds: kept forever.
    events.TOPIC_OPENS_RAW: FOREVER,
    events.TOPIC_ENGAGEMENT: FOREVER,
    # One record per email / profile is all a rebuild needs: compacted, never deleted.
    events.TOPIC_SENDS: COMPACTED,
    events.TOPIC_PROFILES: COMPACTED,
    # Erasure requests are kept: a rebuilt warehouse must apply them again.
    events.TOPIC_ERASURES: FOREVER,
    # Replay requests matter only until the worker has read them.
    events.TOPIC_OPENS_REPLAY: {"retention.ms": str(24 * 3600 * 1000)},
    events.TOPIC_EMAIL_STATE: COMPACTED,
    # Derived, re-creatable by a replay: a week is enough for the loader to catch up.
    events.TOPIC_OPENS_PROCESSED: {"retention.ms": str(7 * 24 * 3600 * 1000)},
}


def ensure_topics(bootstrap: str, partitions: int, replication: int = 1) -> list[str]:
    """Create missing topics; return the names created. Existing topics are left alone."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication, topic_configs=config)
            for name, config in TOPIC_CONFIGS.items()
            if name not in existing
        ]
        if missing:
            # another process may have created them in between
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing, timeout_ms=15000)
            log.info("created topics %s", [t.name for t in missing])
        return [t.name for t in missing]
    finally:
        admin.close()

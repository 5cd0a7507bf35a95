"""Test input into Kafka and what a topic holds, for the tests that check the pipeline by
reading its topics."""

from __future__ import annotations

import json
from collections.abc import Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from opentrack.events import TOPIC_OPENS_RAW, RawOpen

CHANGELOG = "opentrack-streams-emails-changelog"  # the stream workers' table, by email id


def produce_loads(producer: KafkaProducer, loads: Iterable[RawOpen], attempts: int = 3) -> None:
    """Send raw loads to ``opens.raw`` and wait for each acknowledgement; a record that failed
    is sent again (its event id makes a duplicate harmless). kafka-python's ``flush()`` returns
    even when a record expired unsent (seen here under heavy load), which would make a test
    blame the pipeline for loads it never received."""
    pending = list(loads)
    for _ in range(attempts):
        sent = [(raw, producer.send("opens.raw", key=raw.email_id.encode(),
                                    value=raw.to_bytes())) for raw in pending]
        producer.flush()
        pending = [raw for raw, future in sent if future.failed()]
        if not pending:
            return
    raise AssertionError(f"{len(pending)} loads could not be produced in {attempts} attempts")


def topic_records(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record in the topic now, from the beginning ([] for a topic never written)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    records: list[ConsumerRecord] = []
    if tps:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        while any(consumer.position(tp) < offset for tp, offset in end.items()):
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    consumer.close()
    return records


def table_entries(bootstrap: str, email_ids: Iterable[str]) -> dict[str, dict]:
    """What the stream workers' table holds for some emails, from its changelog: for a
    failure message that must say whether a lost load was parked, applied or never seen.
    Each entry: the partition and offset of its newest change, whether the send is known,
    and the event ids of its kept and parked loads."""
    wanted = {f'"{e}"'.encode(): e for e in email_ids}
    entries: dict[str, dict] = {}
    for record in topic_records(bootstrap, CHANGELOG):
        email_id = wanted.get(record.key or b"")
        if email_id is None:
            continue
        value = json.loads(record.value) if record.value else {}
        entries[email_id] = {
            "partition": record.partition, "offset": record.offset,
            "changes": entries.get(email_id, {}).get("changes", 0) + 1,
            "send_known": value.get("sent_at") is not None,
            "loads": [row[1] for row in value.get("loads", [])],
            "parked": [p["event_id"] for p in value.get("pending", [])],
        }
    return entries


def load_stamps(bootstrap: str, email_ids: Iterable[str]) -> dict[str, list[int]]:
    """The ``received_at`` the pixel gave each load of some emails, from ``opens.raw``: the
    event times the stream workers judge by, for a truth computed on the same clock."""
    wanted = set(email_ids)
    stamps: dict[str, list[int]] = {}
    for record in topic_records(bootstrap, TOPIC_OPENS_RAW):
        load = RawOpen.from_bytes(record.value)
        if load.email_id in wanted:
            stamps.setdefault(load.email_id, []).append(load.received_at)
    return stamps

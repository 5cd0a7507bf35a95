"""Test input into Kafka and what a topic holds, for the tests that check the pipeline by
reading its topics."""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from opentrack.events import RawOpen


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

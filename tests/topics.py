"""Producing test input that surely arrived: kafka-python's ``flush()`` returns even when a
record expired unsent (seen on this machine under heavy load), which would make a test
blame the pipeline for loads it never received."""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaProducer

from opentrack.events import RawOpen


def produce_loads(producer: KafkaProducer, loads: Iterable[RawOpen], attempts: int = 3) -> None:
    """Send raw loads to ``opens.raw`` and wait for each acknowledgement; a record that failed
    is sent again (its event id makes a duplicate harmless)."""
    pending = list(loads)
    for _ in range(attempts):
        sent = [(raw, producer.send("opens.raw", key=raw.email_id.encode(),
                                    value=raw.to_bytes())) for raw in pending]
        producer.flush()
        pending = [raw for raw, future in sent if future.failed()]
        if not pending:
            return
    raise AssertionError(f"{len(pending)} loads could not be produced in {attempts} attempts")

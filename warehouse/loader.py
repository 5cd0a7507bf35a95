"""Kafka → ClickHouse in small batches, idempotently, committing only what was written.

Batching: each poll returns what has arrived (up to ``max_records``), waiting at most
``poll_ms`` when nothing has; that batch is inserted at once. So a batch is bounded in size
by ``max_records`` and in latency by ``poll_ms`` plus one insert, which keeps a load visible
in the CRM API well under a second after the worker emitted it.

Failure: when ClickHouse cannot take a batch, the loader retries the same batch with
backoff, forever, without polling further and without committing; offsets are committed only
after every table of the batch was written. A crash before the commit means the batch is
delivered again, and the ReplacingMergeTree keys (see ``warehouse.schema``) absorb it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from prometheus_client import Counter, Histogram
from tenacity import Retrying, retry_if_exception_type, stop_any, wait_exponential

from opentrack import events
from warehouse import facts
from warehouse.engines import Engine
from warehouse.erasure import erase_emails, erased_ids

log = logging.getLogger(__name__)

LOADER_ROWS = Counter("opentrack_loader_rows_total", "Rows written by table", ["table"])
LOADER_RETRIES = Counter("opentrack_loader_retries_total", "Batch inserts retried")
LOADER_SKIPPED = Counter(
    "opentrack_loader_skipped_total", "Malformed messages skipped, by topic", ["topic"]
)
LOADER_BATCH_SECONDS = Histogram(
    "opentrack_loader_batch_seconds", "Time to write one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LOADER_BATCH_ROWS = Histogram(
    "opentrack_loader_batch_rows", "Messages per batch",
    buckets=(1, 10, 100, 1000, 5000, 10000, 50000),
)

SEND_COLUMNS = (
    "email_id", "profile_id", "person_type", "person_id", "template_id", "subject",
    "sequence_id", "sequence_step", "sent_at", "tracking", "registered_at",
)
OPEN_COLUMNS = (
    "event_id", "email_id", "received_at", "load_class", "reason", "counted", "fingerprint",
    "client_family", "os_family", "device_family", "revision",
)
STATE_COLUMNS = (
    "email_id", "opened", "open_count", "human_open_count", "machine_open_count",
    "raw_load_count", "first_opened_at", "last_opened_at", "last_human_opened_at", "revision",
    "first_human_opened_at",
)
ENGAGEMENT_COLUMNS = ("event_id", "email_id", "kind", "at")


def send_row(e: events.SendRegistered) -> tuple[Any, ...]:
    return (
        e.email_id, e.profile_id, e.person_type, e.person_id, e.template_id, e.subject,
        e.sequence_id or "", e.sequence_step or 0, e.sent_at, int(e.tracking), e.registered_at,
    )


def open_row(e: events.ProcessedOpen) -> tuple[Any, ...]:
    return (
        e.event_id, e.email_id, e.received_at, e.load_class, e.reason, int(e.counted),
        e.fingerprint, e.client_family, e.os_family, e.device_family, e.revision,
    )


def state_row(e: events.EmailState) -> tuple[Any, ...]:
    return (
        e.email_id, int(e.opened), e.open_count, e.human_open_count, e.machine_open_count,
        e.raw_load_count, e.first_opened_at or 0, e.last_opened_at or 0,
        e.last_human_opened_at or 0, e.revision, e.first_human_opened_at or 0,
    )


def engagement_row(e: events.Engagement) -> tuple[Any, ...]:
    if e.kind not in events.ENGAGEMENT_KINDS:
        raise ValueError(f"unknown engagement kind {e.kind!r}")
    return (e.event_id, e.email_id, e.kind, e.at)


SINKS: dict[str, tuple[str, tuple[str, ...], type[events.Event], Callable[[Any], tuple]]] = {
    events.TOPIC_SENDS: ("sends", SEND_COLUMNS, events.SendRegistered, send_row),
    events.TOPIC_OPENS_PROCESSED: ("opens", OPEN_COLUMNS, events.ProcessedOpen, open_row),
    events.TOPIC_EMAIL_STATE: ("email_state", STATE_COLUMNS, events.EmailState, state_row),
    events.TOPIC_ENGAGEMENT: ("engagement", ENGAGEMENT_COLUMNS, events.Engagement, engagement_row),
}


def rows_by_table(
    messages: Iterable[tuple[str, bytes]], erased: frozenset[str] | set[str] = frozenset()
) -> dict[str, list[tuple[Any, ...]]]:
    """(topic, value) pairs → rows per table; malformed values are skipped and counted, and
    so are rows of erased emails (still in flight when the erasure was applied)."""
    tables: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for topic, value in messages:
        table, _, event_type, to_row = SINKS[topic]
        try:
            event = event_type.from_bytes(value)
            if event.email_id in erased:  # type: ignore[attr-defined]
                LOADER_SKIPPED.labels(topic=topic).inc()
                continue
            tables[table].append(to_row(event))
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
            LOADER_SKIPPED.labels(topic=topic).inc()
            log.warning("skipping malformed message on %s: %s", topic, exc)
    return tables


# The tables whose rows change an email's facts, and where its email_id is in their rows.
FACT_SOURCES = {
    table: cols.index("email_id") for table, cols, _, _ in SINKS.values() if table != "opens"
}


def write_batch(engine: Engine, tables: dict[str, list[tuple[Any, ...]]]) -> None:
    """Insert the rows, then recompute the facts of the emails they touch (from the tables,
    so that is right whatever order sends, states and engagement came in; see
    ``warehouse.facts``). Opens change the facts through the state the worker emits."""
    columns = {table: cols for table, cols, _, _ in SINKS.values()}
    for table, rows in tables.items():
        engine.insert(table, columns[table], rows)
        LOADER_ROWS.labels(table=table).inc(len(rows))
    touched = {row[i] for table, i in FACT_SOURCES.items() for row in tables.get(table, ())}
    if touched:
        LOADER_ROWS.labels(table="email_facts").inc(facts.refresh(engine, touched))


def erasure_of(value: bytes) -> events.Erasure | None:
    try:
        return events.Erasure.from_bytes(value)
    except (ValueError, TypeError, KeyError) as exc:
        LOADER_SKIPPED.labels(topic=events.TOPIC_ERASURES).inc()
        log.warning("skipping malformed erasure: %s", exc)
        return None


class Loader:
    def __init__(
        self,
        engine: Engine,
        bootstrap: str,
        group_id: str = "opentrack-warehouse",
        topics: Iterable[str] = (*SINKS, events.TOPIC_ERASURES),
        max_records: int = 20000,
        poll_ms: int = 50,
    ) -> None:
        self.engine = engine
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = list(topics)
        self.max_records = max_records
        self.poll_ms = poll_ms
        self.stopping = threading.Event()
        self.erased: set[str] = set()

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        return KafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_records,
            max_poll_interval_ms=30 * 60 * 1000,  # room for a long ClickHouse outage
            fetch_max_wait_ms=self.poll_ms,
            isolation_level="read_committed",
            # A group leader whose metadata lacks a subscribed topic at a rebalance (seen with
            # kafka-python 3.0 under load: "No partition metadata for topic ...") leaves that
            # topic unassigned until its next metadata refresh; Kafka's 5 minutes stalled the
            # warehouse that long, a few seconds bound the stall.
            metadata_max_age_ms=5000,
        )

    def _retry(self, write: Callable[[], Any]) -> bool:
        """Until it works; False only when asked to stop first (and nothing is committed)."""
        retrying = Retrying(
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type(Exception),
            stop=stop_any(lambda _state: self.stopping.is_set()),
            before_sleep=lambda s: (
                LOADER_RETRIES.inc(),
                log.warning("warehouse write failed, retrying: %s", s.outcome.exception()),
            ),
            reraise=False,
        )
        try:
            for attempt in retrying:
                with attempt:
                    write()
        except Exception:
            return False
        return True

    def _apply(self, rows: dict[str, list[tuple[Any, ...]]], erased: set[str]) -> None:
        write_batch(self.engine, rows)
        erase_emails(self.engine, erased)

    def run(self) -> None:
        from kafka.errors import CommitFailedError

        if not self._retry(lambda: self.erased.update(erased_ids(self.engine))):
            return
        consumer = self._consumer()
        log.info("loader consuming %s", ", ".join(self.topics))
        try:
            while not self.stopping.is_set():
                polled = consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records)
                if not polled:
                    continue
                messages = [
                    (tp.topic, rec.value) for tp, recs in polled.items() for rec in recs
                    if rec.value is not None
                ]
                started = time.perf_counter()
                erasures = [erasure_of(v) for t, v in messages if t == events.TOPIC_ERASURES]
                erased_now = {i for e in erasures if e for i in e.email_ids}
                self.erased |= erased_now
                rows = rows_by_table(
                    ((t, v) for t, v in messages if t != events.TOPIC_ERASURES), self.erased
                )
                if not self._retry(partial(self._apply, rows, erased_now)):
                    break
                LOADER_BATCH_SECONDS.observe(time.perf_counter() - started)
                LOADER_BATCH_ROWS.observe(len(messages))
                try:
                    consumer.commit()
                except CommitFailedError as exc:  # rebalanced meanwhile: it comes again
                    log.warning("offset commit failed, the batch will be redelivered: %s", exc)
        finally:
            consumer.close()

    def stop(self) -> None:
        self.stopping.set()

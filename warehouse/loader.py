"""Kafka → ClickHouse in small batches, idempotently, committing only what was written.

Batching: each poll returns what has arrived (up to ``max_records``), waiting at most
``poll_ms`` when nothing has; that batch is inserted at once. So a batch is bounded in size
by ``max_records`` and in latency by ``poll_ms`` plus one insert, which keeps a load visible
in the CRM API well under a second after the worker emitted it.

Failure: when ClickHouse cannot take a batch, the loader retries the same batch with
backoff, forever, without polling further and without committing; offsets are committed only
after every table of the batch was written. A crash before the commit means the batch is
delivered again, and the ReplacingMergeTree keys (see ``warehouse.schema``) absorb it.

Write path: on a ClickHouse server, the row builders (``rows_by_table``: bytes → events →
row tuples, in Python) and ``write_batch``. On chDB, ``TableWriter``'s fast path: the JSON
values as they are, parsed once by ClickHouse into the tables (about 7 µs a row less in
Python, and no row tuples through the client), the erasures of the batch applied first so
that their emails' rows are left out, the facts of the emails written refreshed inside
ClickHouse; any topic's part of a batch it cannot take (a malformed value) goes through the
row builders. Both write the same rows (``tests/test_loader_fast_path.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client import Counter, Histogram
from tenacity import Retrying, retry_if_exception_type, stop_any, wait_exponential

from opentrack import events
from warehouse import facts
from warehouse.assignment import AssignmentWatch
from warehouse.engines import ChdbEngine, Engine
from warehouse.erasure import erase_emails, erased_ids

log = logging.getLogger(__name__)

# Under a backlog, how long the facts of written emails may wait (see ``Loader.write``).
FACTS_LAG_SECONDS = 2.0
# What one fetch may bring of a partition. Kafka's 1 MiB gave polls of about 12k records
# (310 bytes each, 4 partitions) however large ``max_records``: a backlog came in batches
# smaller than the loader's, and each batch's inserts cost their fixed part again.
FETCH_BYTES_PER_PARTITION = 4 * 1024 * 1024


LOADER_ROWS = Counter("opentrack_loader_rows_total", "Rows written by table", ["table"])
LOADER_RETRIES = Counter("opentrack_loader_retries_total", "Batch inserts retried")
LOADER_REJOINS = Counter(
    "opentrack_loader_rejoins_total",
    "Consumers replaced because no member of the group held a partition",
)
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


# -- the fast path (chDB) ----------------------------------------------------------------
# The topics whose row builders only copy the event's fields (None as "" or 0), and what
# else they check: the fast path may take them.
FAST_TOPICS = (events.TOPIC_SENDS, events.TOPIC_OPENS_PROCESSED, events.TOPIC_EMAIL_STATE,
               events.TOPIC_ENGAGEMENT)
# Values a row builder refuses besides the types: a CAST to an Enum of the allowed ones.
_KINDS = ", ".join(f"'{kind}' = {i}" for i, kind in enumerate(events.ENGAGEMENT_KINDS, 1))
_VALUE_CHECKS = {events.TOPIC_ENGAGEMENT: {"kind": f"Enum8({_KINDS})"}}
# ClickHouse reads each JSON value as the type of its field, and nothing else; in one
# thread (parallel parsing cost a third more CPU and three times the time on two busy cores).
_STRICT_JSON = (
    "input_format_parallel_parsing = 0, "
    "input_format_skip_unknown_fields = 1, input_format_json_read_numbers_as_strings = 0, "
    "input_format_json_read_bools_as_numbers = 0, input_format_json_read_bools_as_strings = 0, "
    "input_format_json_read_objects_as_strings = 0, "
    "input_format_json_read_arrays_as_strings = 0"
)
_ERASED = "email_id IN (SELECT email_id FROM erased_emails)"
_EMPTY = {"String": "''", "Int64": "0", "UInt8": "0"}
_SQL_TYPES = {"str": "String", "str | None": "String", "int": "Int64", "int | None": "Int64",
              "bool": "Bool"}


@dataclass
class WriteCounts:
    """What a ``TableWriter`` wrote (a reload's result adds what else it did)."""

    rows: dict[str, int] = field(default_factory=dict)  # written, by table
    skipped: int = 0  # malformed, or of an erased email
    fallback_batches: int = 0  # batches the fast path left to the row builders


@dataclass(frozen=True)
class _FastTable:
    """The SQL of one table's fast path: a Null table of the event's fields that the JSON
    values are inserted into, a view that moves them into the table (checked, without the
    rows of erased emails), and one that keeps their email ids for the counts and the
    facts."""

    objects: tuple[str, ...]  # CREATE statements, in order
    names: tuple[str, ...]  # what they create, views first (the order to drop them)
    insert: bytes  # the values follow, a line each
    ids: str  # the email ids of what was inserted since the last clear
    clear: str


def _fast_table(engine: Engine, topic: str, stage: str) -> _FastTable | None:
    """The fast path of a topic, or None when its table holds a column that is not a plain
    field of the event, or the event a field that is not a column (the row builders
    write it then)."""
    table, columns, event_type, _ = SINKS[topic]
    event_fields = {f.name: f for f in dataclasses.fields(event_type)}
    present = {r["name"] for r in engine.query(f"DESCRIBE TABLE {table}")}
    if set(columns) != set(event_fields) or not set(columns) <= present:
        return None
    if any(str(f.type) not in _SQL_TYPES for f in event_fields.values()):
        return None  # a field ClickHouse would read differently (a dict, a list)
    selects = []
    for column in columns:
        f = event_fields[column]
        kind = str(f.type)
        sql_type = _SQL_TYPES[kind].replace("Bool", "UInt8")
        value = f"toUInt8({column})" if kind == "bool" else column
        # required as ``from_dict`` requires: no default (a computed one counts as none);
        # CAST of a NULL (absent or null) to a plain type fails the whole insert
        if f.default is dataclasses.MISSING:
            expression = f"CAST({value}, '{sql_type}')"
        elif f.default is None:
            expression = f"ifNull({value}, {_EMPTY[sql_type]})"
        elif isinstance(f.default, bool | int):
            expression = f"ifNull({value}, {int(f.default)})"
        else:
            default = str(f.default).replace("\\", "\\\\").replace("'", "\\'")
            expression = f"ifNull({value}, '{default}')"
        if column in _VALUE_CHECKS.get(topic, {}):  # CAST to an Enum refuses other values
            expression = f"toString(CAST({expression} AS {_VALUE_CHECKS[topic][column]}))"
        selects.append(f"{expression} AS {column}")
    structure = ", ".join(
        f"{name} Nullable({_SQL_TYPES[str(f.type)]})" for name, f in event_fields.items())
    ids, move, keep = f"{stage}_ids", f"{stage}_move", f"{stage}_keep"
    return _FastTable(
        objects=(
            f"CREATE TABLE {stage} ({structure}) ENGINE = Null",
            f"CREATE TABLE {ids} (email_id String) ENGINE = Memory",
            f"CREATE MATERIALIZED VIEW {move} TO {table} AS SELECT {', '.join(selects)} "
            f"FROM {stage} WHERE NOT {_ERASED}",
            f"CREATE MATERIALIZED VIEW {keep} TO {ids} AS "
            f"SELECT assumeNotNull(email_id) AS email_id FROM {stage}",
        ),
        names=(move, keep, stage, ids),
        insert=f"INSERT INTO {stage} SETTINGS {_STRICT_JSON} FORMAT JSONEachRow".encode(),
        ids=ids,
        clear=f"TRUNCATE TABLE {ids}",
    )


def drop_staging(engine: Engine, prefix: str) -> None:
    """Drop what fast-path writers named ``prefix...`` left (a crashed process's), views
    first: only where nothing writes through them (at the start of the process that owns
    the warehouse)."""
    found = engine.query(
        "SELECT name, engine = 'MaterializedView' AS view FROM system.tables "
        "WHERE database = currentDatabase() AND startsWith(name, %(p)s)", {"p": prefix})
    for row in sorted(found, key=lambda r: not r["view"]):
        engine.execute(f"DROP TABLE IF EXISTS {row['name']}")


class TableWriter:
    """Writes one topic's values the loader's way: the fast path where it applies, the row
    builders otherwise. The live loader (``Loader.write``) and a reload
    (``warehouse.reload``) both write through it on chDB.

    The fast path (chDB only): the JSON values go to ClickHouse as they are, parsed once
    into a Null table of the event's fields (``{prefix}_{table}``) whose materialized views
    write them into the table (without the rows of erased emails: apply an erasure before
    writing the rows it refuses) and keep their email ids. A batch with a record the row
    builders would treat specially (a missing field, a null where a value is required, a
    value of the wrong type, not JSON) or an engagement kind it does not know fails that
    insert as a whole, and goes through the row builders instead, which skip what is
    malformed; ``tests/test_replay.py`` and ``tests/test_loader_fast_path.py`` check that
    both write the same rows. The fast path is a little more lenient only on values no
    OpenTrack producer writes: a number in quotes, 0 or 1 for a boolean. The emails it
    wrote are recorded (``{prefix}_touched``), and ``refresh_facts`` recomputes their facts.

    Failure: a statement that fails can leave email ids behind; ``reset`` empties them, so
    that writing the batch again counts it once (the emails whose facts are due stay: a
    refresh of more emails than were written is harmless). Not thread-safe: one writer per
    thread, each with its own ``prefix``."""

    def __init__(
        self, engine: Engine, erased: set[str], fast: bool | None = None,
        result: WriteCounts | None = None, prefix: str | None = None,
    ) -> None:
        self.engine = engine
        self.erased = erased  # for the row builders; the fast path reads erased_emails
        self.result = result if result is not None else WriteCounts()
        if fast is None:
            fast = isinstance(engine, ChdbEngine)
        prefix = prefix or f"stage_{uuid.uuid4().hex[:8]}"
        self._touched = f"{prefix}_touched"
        self._touched_any = False
        self._pending: list[str] = []  # topics written by the fast path, not yet counted
        self._fast: dict[str, _FastTable] = {}
        if not fast:
            return
        drop_staging(engine, f"{prefix}_")  # a crashed writer's (a fixed prefix), or none
        for topic in FAST_TOPICS:
            sql = _fast_table(engine, topic, f"{prefix}_{SINKS[topic][0]}")
            if sql is not None:
                for create in sql.objects:
                    engine.execute(create)
                self._fast[topic] = sql
        if self._fast:
            engine.execute(f"CREATE TABLE {self._touched} (email_id String) ENGINE = Memory")

    @property
    def fast(self) -> bool:
        return bool(self._fast)

    def write(self, topic: str, values: Sequence[bytes | None]) -> None:
        """One topic's values, counted at once."""
        self.write_topics({topic: values})

    def write_topics(self, values_by_topic: Mapping[str, Sequence[bytes | None]]) -> None:
        """Several topics' values (a polled batch), counted in one statement."""
        for topic, values in values_by_topic.items():
            self._write(topic, values)
        self._count()

    def _write(self, topic: str, values: Sequence[bytes | None]) -> None:
        present = [v for v in values if v is not None]  # tombstones: erased sends
        if not present:
            return
        sql = self._fast.get(topic)
        if sql is not None and self._write_fast(topic, sql, present):
            return
        if sql is not None:
            self.result.fallback_batches += 1
        tables = rows_by_table(((topic, v) for v in present), self.erased)
        write_batch(self.engine, tables)
        written = sum(len(rows) for rows in tables.values())
        self.result.skipped += len(present) - written
        for table, rows in tables.items():
            self.result.rows[table] = self.result.rows.get(table, 0) + len(rows)

    def _write_fast(self, topic: str, sql: _FastTable, values: list[bytes]) -> bool:
        """False when the batch needs the row builders (nothing of it was written)."""
        try:
            self.engine.execute(b"\n".join((sql.insert, *values)).decode())
        except (UnicodeDecodeError, RuntimeError) as exc:  # chDB: a value it cannot take
            log.info("a %s batch goes through the row builders: %s", topic, exc)
            self.engine.execute(sql.clear)  # what a view may have kept before the failure
            return False
        self._pending.append(topic)
        return True

    def _count(self) -> None:
        """The rows the fast path wrote and left out (of erased emails) since the last
        count; the emails it wrote, for the facts (opens reach them through states)."""
        if not self._pending:
            return
        tables = {topic: self._fast[topic].ids for topic in dict.fromkeys(self._pending)}
        counts = self.engine.query(  # one set of the erased ids for all
            f"SELECT topic, countIf({_ERASED}) AS erased, count() AS n FROM ("
            + " UNION ALL ".join(f"SELECT '{topic}' AS topic, email_id FROM {ids}"
                                 for topic, ids in tables.items())
            + ") GROUP BY topic")
        emails = [ids for topic, ids in tables.items() if topic != events.TOPIC_OPENS_PROCESSED]
        if emails:
            self.engine.execute(
                f"INSERT INTO {self._touched} SELECT DISTINCT email_id FROM ("
                + " UNION ALL ".join(f"SELECT email_id FROM {ids}" for ids in emails)
                + f") WHERE NOT {_ERASED}")
            self._touched_any = True
        for topic in tables:
            self.engine.execute(self._fast[topic].clear)
        self._pending.clear()
        for row in counts:
            topic, table = row["topic"], SINKS[row["topic"]][0]
            written = row["n"] - row["erased"]
            self.result.rows[table] = self.result.rows.get(table, 0) + written
            self.result.skipped += row["erased"]
            LOADER_ROWS.labels(table=table).inc(written)
            if row["erased"]:
                LOADER_SKIPPED.labels(topic=topic).inc(row["erased"])

    def refresh_facts(self) -> None:
        """The facts of the emails the fast path wrote since the last refresh, from the
        tables, in one statement."""
        if self._touched_any:
            facts.refresh_matching(self.engine, f"SELECT email_id FROM {self._touched}")
            self.engine.execute(f"TRUNCATE TABLE {self._touched}")
            self._touched_any = False

    @property
    def facts_due(self) -> bool:
        """Emails written whose facts are not refreshed yet."""
        return self._touched_any

    def reset(self) -> None:
        """Forget the email ids kept for counting: after a failure, before the batch is
        written again."""
        for sql in self._fast.values():
            self.engine.execute(sql.clear)
        self._pending.clear()

    def close(self) -> None:
        for sql in self._fast.values():
            for name in sql.names:
                self.engine.execute(f"DROP TABLE IF EXISTS {name}")
        if self._fast:
            self.engine.execute(f"DROP TABLE IF EXISTS {self._touched}")


def is_backlog(polled: Mapping[Any, Sequence[Any]], highwater: Callable[[Any], int | None],
               max_records: int) -> bool:
    """More records wait in Kafka than this poll brought: it was full, or a partition it
    read from has records past its last one (``highwater``: the next offset there, as the
    last fetch reported it)."""
    if sum(len(records) for records in polled.values()) >= max_records:
        return True
    for partition, records in polled.items():
        end = highwater(partition)
        if records and end is not None and records[-1].offset + 1 < end:
            return True
    return False


class Loader:
    def __init__(
        self,
        engine: Engine,
        bootstrap: str,
        group_id: str = "opentrack-warehouse",
        topics: Iterable[str] = (*SINKS, events.TOPIC_ERASURES),
        max_records: int = 50000,
        poll_ms: int = 50,
        fast: bool | None = None,
        facts_lag: float = FACTS_LAG_SECONDS,
    ) -> None:
        self.engine = engine
        # chDB: each batch through the fast path (TableWriter); the row builders otherwise
        self.fast = isinstance(engine, ChdbEngine) if fast is None else fast
        self._writer: TableWriter | None = None
        self._unclean = False  # a failed fast write may have left email ids behind
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = list(topics)
        self.max_records = max_records
        self.poll_ms = poll_ms
        self.facts_lag = facts_lag
        self._facts_due_since: float | None = None
        self.stopping = threading.Event()
        self.erased: set[str] = set()

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_records,
            max_partition_fetch_bytes=FETCH_BYTES_PER_PARTITION,
            max_poll_interval_ms=30 * 60 * 1000,  # room for a long ClickHouse outage
            fetch_max_wait_ms=self.poll_ms,
            isolation_level="read_committed",
            # A group leader whose metadata lacks a subscribed topic at a rebalance (seen with
            # kafka-python 3.0 under load: "No partition metadata for topic ...") leaves that
            # topic unassigned until its next metadata refresh; Kafka's 5 minutes stalled the
            # warehouse that long, a few seconds bound the stall.
            metadata_max_age_ms=5000,
        )
        # Known partitions before the first join, so that it assigns them (it otherwise often
        # found no metadata at all and relied on a rejoin at the next refresh).
        for topic in self.topics:
            consumer.partitions_for_topic(topic)
        consumer.subscribe(self.topics)
        return consumer

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

    def _apply_fast(self, by_topic: dict[str, list[bytes]], erased: set[str],
                    settle: bool) -> None:
        """Erasures first: the fast path's views then leave out their emails' rows (they
        read ``erased_emails``), as the row builders do (``self.erased``), so the end is the
        same as ``_apply``'s. Then each topic, then (if ``settle``) the facts of the emails
        written since the last refresh."""
        if self._writer is None:
            self._writer = TableWriter(self.engine, self.erased, fast=True, prefix="loader_stage")
        writer = self._writer
        if self._unclean:  # the last attempt failed half-way: forget the ids it kept
            writer.reset()
        self._unclean = True
        erase_emails(self.engine, erased)
        writer.write_topics(by_topic)
        if settle:
            writer.refresh_facts()
        self._unclean = False

    @property
    def settled(self) -> bool:
        """Everything written is in the warehouse with its facts: offsets may be committed."""
        return self._writer is None or not self._writer.facts_due

    def write(self, messages: Sequence[tuple[str, bytes | None]],
              backlog: bool | None = None) -> bool:
        """Write one polled batch of (topic, value) pairs, retrying until it is written;
        False only when asked to stop first (then nothing may be committed).

        On the fast path, a batch with more waiting behind it (``backlog``: catching up, a
        replay; by default, a full batch) leaves the facts of its emails to a later batch,
        for up to ``facts_lag`` seconds: a refresh reads every granule its emails touch,
        which at 1M emails is most of the tables, so one refresh per second or two instead
        of one per batch is most of the loader's speed under a backlog. Offsets may be
        committed only once ``settled``."""
        by_topic: dict[str, list[bytes]] = defaultdict(list)
        for topic, value in messages:
            if value is not None:  # tombstones
                by_topic[topic].append(value)
        erasures = [erasure_of(v) for v in by_topic.pop(events.TOPIC_ERASURES, ())]
        erased_now = {i for e in erasures if e for i in e.email_ids}
        self.erased |= erased_now
        if self.fast:
            now = time.monotonic()
            if self._facts_due_since is None:
                self._facts_due_since = now
            if backlog is None:
                backlog = len(messages) >= self.max_records
            settle = not backlog or now - self._facts_due_since >= self.facts_lag
            if not self._retry(partial(self._apply_fast, by_topic, erased_now, settle)):
                return False
            if settle:
                self._facts_due_since = None
            return True
        rows = rows_by_table(((t, v) for t, values in by_topic.items() for v in values),
                             self.erased)
        return self._retry(partial(self._apply, rows, erased_now))

    def settle(self) -> bool:
        """Refresh the facts still due (the backlog is over); False only when asked to stop
        first."""
        writer = self._writer
        if writer is None or not writer.facts_due:
            return True
        if not self._retry(writer.refresh_facts):
            return False
        self._facts_due_since = None
        return True

    def run(self) -> None:
        if not self._retry(lambda: self.erased.update(erased_ids(self.engine))):
            return
        consumer = self._consumer()
        watch = AssignmentWatch(self.bootstrap, self.group_id)
        log.info("loader consuming %s", ", ".join(self.topics))
        try:
            while not self.stopping.is_set():
                polled = consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records)
                if not polled:
                    if not self.settled:  # the backlog is over: the facts it left, then commit
                        if not self.settle():
                            break
                        self._commit(consumer)
                    if watch.stuck(consumer):
                        log.warning("no partition assigned to this loader or any other in "
                                    "group %s for %.0f s: joining it again with a new consumer",
                                    self.group_id, watch.patience)
                        LOADER_REJOINS.inc()
                        consumer.close(autocommit=False)
                        consumer = self._consumer()
                    continue
                messages = [(tp.topic, rec.value) for tp, recs in polled.items() for rec in recs]
                backlog = is_backlog(polled, consumer.highwater, self.max_records)
                started = time.perf_counter()
                if not self.write(messages, backlog):
                    break
                LOADER_BATCH_SECONDS.observe(time.perf_counter() - started)
                LOADER_BATCH_ROWS.observe(sum(v is not None for _, v in messages))
                if self.settled:
                    self._commit(consumer)
        finally:
            consumer.close()
            self.close()

    @staticmethod
    def _commit(consumer: Any) -> None:
        """Commit what was polled; a commit that fails (a rebalance under way or done
        meanwhile: kafka-python raises RebalanceInProgressError as well as
        CommitFailedError; the coordinator away) leaves those batches to be delivered again,
        which changes no count. It once stopped the loader (a replay test in CI)."""
        from kafka.errors import KafkaError

        try:
            consumer.commit()
        except KafkaError as exc:
            log.warning("offset commit failed, the batches since the last commit will be "
                        "redelivered: %s", exc)

    def close(self) -> None:
        """Drop the staging tables (the next loader's would replace them anyway)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def stop(self) -> None:
        self.stopping.set()

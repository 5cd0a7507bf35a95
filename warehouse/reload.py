"""Warehouse reload: the tables written again from the topics the loader reads.

Why: a warehouse-only replay (``opentrack replay --into warehouse`` without ``--reclassify``)
needs no stream processing. What the worker made (``opens.processed``, ``email_state``), the
sends and the engagement are still in Kafka, so reading them again and writing them the way
the loader does is bounded by Kafka and ClickHouse, not by the worker.

Where it runs: in the process that owns the warehouse. For chDB (one process per data path)
that is ``opentrack loader``, which serves a reload on the warehouse socket (see
``warehouse.service``); on a ClickHouse server the replay runs it itself. The loader goes on
with live traffic meanwhile: both write through the same engine.

Write path: the loader's own, ``warehouse.loader.TableWriter``: on chDB the fast path (the
JSON values straight into ClickHouse, through a Null table whose materialized views write
the table; the batches it cannot take through the row builders), on a ClickHouse server the
row builders and batch insert (``rows_by_table``, ``write_batch``). The emails' facts
(``warehouse.facts``), which the live loader refreshes batch by batch, are refreshed once at
the end for the emails the fast path wrote (a refresh scans the tables, whatever its size).

Idempotent: the tables are ReplacingMergeTrees keyed as the loader keys them, so a reload
(or two) of rows the warehouse has changes nothing. Erasures first: every erasure in Kafka is
applied before any row is written, and erasures that arrive during the reload are applied
again after it, so a reload never brings back an erased person's rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentrack import events
from warehouse.engines import Engine
from warehouse.erasure import erase_emails, erased_ids
from warehouse.loader import TableWriter, WriteCounts, erasure_of

log = logging.getLogger(__name__)

RELOAD_TOPICS = (
    events.TOPIC_OPENS_PROCESSED, events.TOPIC_EMAIL_STATE, events.TOPIC_SENDS,
    events.TOPIC_ENGAGEMENT,
)
# Records per insert: large enough for ClickHouse, small enough that a live batch of the
# loader never waits long behind one (they share the engine's lock).
BATCH_RECORDS = 50_000


class ReloadError(RuntimeError):
    """The reload could not be done; nothing is wrong with what it already wrote."""


@dataclass(frozen=True)
class Span:
    """Offsets ``[start, end)`` of one partition of a topic the loader reads."""

    topic: str
    partition: int
    start: int
    end: int

    @classmethod
    def from_dict(cls, data: Any) -> Span:
        try:
            span = cls(str(data["topic"]), int(data["partition"]), int(data["start"]),
                       int(data["end"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReloadError(f"a span is topic, partition, start, end: {data!r}") from exc
        if span.topic not in RELOAD_TOPICS:
            raise ReloadError(f"{span.topic} is not a topic the warehouse is loaded from")
        return span

    @property
    def count(self) -> int:
        return max(0, self.end - self.start)


@dataclass
class ReloadResult(WriteCounts):
    read: int = 0
    erasures_applied: int = 0
    changed_states: int = 0
    changed_rows: int = 0
    reclassified: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each step, in order
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Snapshot:
    """What the replay summary compares: each state's revision, each open's class and
    dedup verdict, kept in Memory tables of the warehouse (they can be large)."""

    def __init__(self, engine: Engine, since_ms: int | None) -> None:
        self.engine = engine
        suffix = uuid.uuid4().hex[:8]
        self.states, self.opens = f"reload_before_states_{suffix}", f"reload_before_opens_{suffix}"
        self.opens_where = f"WHERE received_at >= {int(since_ms)}" if since_ms else ""

    def take(self) -> None:
        self.engine.execute(f"CREATE TABLE {self.states} ENGINE = Memory AS "
                            "SELECT email_id, revision FROM email_state FINAL")
        self.engine.execute(f"CREATE TABLE {self.opens} ENGINE = Memory AS SELECT event_id, "
                            f"load_class, counted FROM opens FINAL {self.opens_where}")

    def compare(self, result: ReloadResult) -> None:
        result.changed_states = self.engine.query(
            "SELECT count() AS n FROM email_state FINAL WHERE (email_id, revision) "
            f"NOT IN (SELECT email_id, revision FROM {self.states})")[0]["n"]
        opens = f"(SELECT event_id, load_class, counted FROM opens FINAL {self.opens_where})"
        result.changed_rows = self.engine.query(
            f"SELECT count() AS n FROM {opens} WHERE (event_id, load_class, counted) "
            f"NOT IN (SELECT event_id, load_class, counted FROM {self.opens})")[0]["n"]
        result.reclassified = self.engine.query(
            f"SELECT count() AS n FROM {opens} AS after INNER JOIN {self.opens} AS before "
            "ON after.event_id = before.event_id WHERE after.load_class != before.load_class"
        )[0]["n"]

    def drop(self) -> None:
        for name in (self.states, self.opens):
            self.engine.execute(f"DROP TABLE IF EXISTS {name}")


class Reload:
    """One reload: reads ``spans`` from Kafka (aiokafka: its record parsing and CRC checks
    are compiled) while another thread writes the batches, so reading and ClickHouse's work
    overlap."""

    def __init__(
        self,
        engine: Engine,
        bootstrap: str,
        spans: Sequence[Span],
        *,
        since_ms: int | None = None,
        diff: bool = True,
        batch_records: int = BATCH_RECORDS,
        fast: bool | None = None,
    ) -> None:
        self.engine = engine
        self.bootstrap = bootstrap
        self.spans = [s for s in spans if s.count]
        self.since_ms = since_ms
        self.diff = diff
        self.batch_records = batch_records
        self.fast = fast
        self.total = sum(s.count for s in self.spans)
        self.stopping = threading.Event()
        self.result = ReloadResult()

    def stop(self) -> None:
        self.stopping.set()

    def progress(self) -> dict[str, Any]:
        return {"read": self.result.read, "total": self.total,
                "written": sum(self.result.rows.values())}

    def _phase(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.result.phases[name] = round(now - started, 2)
        return now

    def run(self) -> ReloadResult:
        started = at = time.monotonic()
        erased = erased_ids(self.engine)
        in_kafka = asyncio.run(self._erasures())
        if in_kafka - erased:
            erase_emails(self.engine, in_kafka - erased)
            self.result.erasures_applied = len(in_kafka - erased)
        erased |= in_kafka
        at = self._phase("erasures", at)
        snapshot = _Snapshot(self.engine, self.since_ms) if self.diff else None
        writer = TableWriter(self.engine, erased, self.fast, self.result,
                             prefix=f"reload_{uuid.uuid4().hex[:8]}")
        try:
            if snapshot is not None:
                snapshot.take()
                at = self._phase("snapshot", at)
            self._copy(writer)
            at = self._phase("copy", at)
            writer.refresh_facts()
            later = erased_ids(self.engine) - erased
            if later:  # erased while the reload wrote: their rows go again
                erase_emails(self.engine, later)
            at = self._phase("facts", at)
            if snapshot is not None and not self.result.stopped:
                snapshot.compare(self.result)
                self._phase("compare", at)
        finally:
            writer.close()
            if snapshot is not None:
                snapshot.drop()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _copy(self, writer: TableWriter) -> None:
        batches: queue.Queue[tuple[str, list[bytes | None]] | None] = queue.Queue(maxsize=4)
        failure: list[BaseException] = []

        def write_all() -> None:
            while (item := batches.get()) is not None:
                if failure:
                    continue  # drain, so that the reader never blocks on a full queue
                try:
                    writer.write(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                    failure.append(exc)
                    self.stopping.set()

        thread = threading.Thread(target=write_all, name="reload-writer", daemon=True)
        thread.start()
        try:
            asyncio.run(self._read(batches.put))
        finally:
            batches.put(None)
            thread.join()
        if failure:
            raise ReloadError(f"writing the warehouse failed: {failure[0]}") from failure[0]
        self.result.stopped = self.stopping.is_set()

    async def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
        )
        await consumer.start()
        return consumer

    async def _erasures(self) -> set[str]:
        """Every email id an erasure in Kafka names (the topic is kept for ever)."""
        from kafka import KafkaConsumer, TopicPartition

        # metadata and offsets only (kafka-python checks CRCs in Python, which is slow for
        # records, but here it reads none)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            tps = [TopicPartition(events.TOPIC_ERASURES, p)
                   for p in sorted(consumer.partitions_for_topic(events.TOPIC_ERASURES) or ())]
            firsts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        finally:
            consumer.close()
        spans = [Span(tp.topic, tp.partition, firsts[tp], ends[tp]) for tp in tps]
        ids: set[str] = set()

        def collect(_topic: str, values: list[bytes | None]) -> None:
            for value in values:
                erasure = erasure_of(value) if value is not None else None
                if erasure is not None:
                    ids.update(erasure.email_ids)

        await self._read_spans(spans, collect, count=False)
        return ids

    async def _read(self, deliver: Callable[[tuple[str, list[bytes | None]]], None]) -> None:
        buffers: dict[str, list[bytes | None]] = {}

        def add(topic: str, values: list[bytes | None]) -> None:
            buffer = buffers.setdefault(topic, [])
            buffer.extend(values)
            if len(buffer) >= self.batch_records:
                deliver((topic, buffers.pop(topic)))

        await self._read_spans(self.spans, add, count=True)
        for topic, buffer in buffers.items():
            deliver((topic, buffer))

    async def _read_spans(
        self, spans: Sequence[Span], add: Callable[[str, list[bytes | None]], None], count: bool
    ) -> None:
        from aiokafka.structs import TopicPartition

        todo = {TopicPartition(s.topic, s.partition): s for s in spans if s.count}
        if not todo:
            return
        consumer = await self._consumer()
        try:
            consumer.assign(list(todo))
            for tp, span in todo.items():
                consumer.seek(tp, span.start)
            while todo and not self.stopping.is_set():
                # the writer thread may block this loop on a full queue: that is the pace
                polled = await consumer.getmany(timeout_ms=500, max_records=20_000)
                for tp, records in polled.items():
                    span = todo.get(tp)
                    if span is None or not records:
                        continue
                    if records[-1].offset >= span.end:
                        records = [r for r in records if r.offset < span.end]
                    if count:
                        self.result.read += len(records)
                    add(tp.topic, [r.value for r in records])
                    if not records or records[-1].offset + 1 >= span.end:
                        del todo[tp]
                        consumer.pause(tp)
                if not polled:  # compacted or deleted records can leave gaps at the end
                    for tp in list(todo):
                        if await consumer.position(tp) >= todo[tp].end:
                            del todo[tp]
        finally:
            await consumer.stop()

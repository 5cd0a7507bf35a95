"""The live loader's fast path on chDB (``Loader.write`` through ``TableWriter``) against its
row builders, and a write that fails half-way then is retried."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from opentrack import events
from warehouse.engines import Engine
from warehouse.loader import LOADER_ROWS, LOADER_SKIPPED, SINKS, Loader, is_backlog

TABLES = ("sends", "sends_by_person", "opens", "email_state", "engagement", "email_facts",
          "email_lookup")


def _send(email_id: str) -> events.SendRegistered:
    return events.SendRegistered(email_id, "p1", "candidate", f"c-{email_id}", "t1",
                                 "Hé\n\"quoted\"", 1000, registered_at=1001)


def _batches(p: str) -> list[list[tuple[str, bytes | None]]]:
    """Two polled batches: the second erases an email loaded by the first and brings more of
    its rows, redelivers messages of the first, holds a malformed value and a tombstone."""
    a, b, gone = f"{p}a", f"{p}b", f"{p}gone"

    def m(event: events.Event) -> tuple[str, bytes]:
        return event.topic, event.to_bytes()

    first = [
        m(_send(a)), m(_send(b)), m(_send(gone)),
        m(events.ProcessedOpen(f"{p}e1", a, 5, "human", "", True, "fp")),
        m(events.ProcessedOpen(f"{p}e2", gone, 6, "machine", "apple_mpp", False, "fp")),
        m(events.EmailState(a, True, 1, 1, 0, 1, 5, 5, 5, 1, 5)),
        m(events.EmailState(gone, revision=1)),
        m(events.Engagement(f"{p}r1", b, "reply", 30)),
    ]
    second = [
        m(events.Erasure(f"{p}x", "candidate", f"c-{gone}", [gone], 50)),
        (events.TOPIC_SENDS, None),  # the erased send's tombstone
        m(events.ProcessedOpen(f"{p}e3", gone, 60, "human", "", True, "fp")),  # in flight
        m(events.EmailState(gone, True, 1, 1, 0, 2, 60, 60, 60, 2, 60)),
        m(events.Engagement(f"{p}r2", gone, "reply", 61)),
        first[3], first[5], first[7],  # redelivered
        m(events.ProcessedOpen(f"{p}e4", a, 70, "human", "", True, "fp2", revision=2)),
        m(events.EmailState(a, True, 2, 2, 0, 2, 5, 70, 70, 2, 5)),
        (events.TOPIC_OPENS_PROCESSED, b"not json"),
        (events.TOPIC_EMAIL_STATE, b'{"email_id":"%sb","revision":"x"}' % p.encode()),
        m(events.Engagement(f"{p}u1", b, "unsubscribe", 80)),
    ]
    return [first, second]


def _rows(engine: Engine, table: str, prefix: str) -> list[str]:
    found = engine.query(f"SELECT * FROM {table} FINAL WHERE startsWith(email_id, %(p)s)",
                         {"p": prefix})
    return sorted(repr(sorted(r.items())).replace(prefix, "<id>-") for r in found)


def _counters() -> dict[str, float]:
    values = {f"rows {t}": LOADER_ROWS.labels(table=t)._value.get()
              for t, *_ in SINKS.values()}
    values.update({f"skipped {t}": LOADER_SKIPPED.labels(topic=t)._value.get()
                   for t in (*SINKS, events.TOPIC_ERASURES)})
    return values


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in _counters().items()}


def _staging(engine: Engine) -> list[dict[str, Any]]:
    return engine.query("SELECT name, total_rows FROM system.tables WHERE database = "
                        "currentDatabase() AND startsWith(name, 'loader_stage_')")


@pytest.mark.parametrize("warehouse_engine", ["chdb"], indirect=True)
def test_fast_path_writes_what_the_row_builders_write(warehouse_engine: Engine) -> None:
    engine = warehouse_engine
    run = uuid.uuid4().hex[:6]
    fast_prefix, rows_prefix = f"lfast{run}-", f"lrows{run}-"
    counted = {}
    for prefix, fast in ((fast_prefix, True), (rows_prefix, False)):
        loader = Loader(engine, "unused:9092", fast=fast)
        assert loader.fast is fast
        before = _counters()
        try:
            for batch in _batches(prefix):
                assert loader.write(batch)
            assert loader.write(_batches(prefix)[1])  # the whole batch delivered again
        finally:
            loader.close()
        counted[prefix] = _delta(before)
    for table in TABLES:
        assert _rows(engine, table, fast_prefix) == _rows(engine, table, rows_prefix), table
    assert _rows(engine, "opens", fast_prefix)
    assert not [r for t in TABLES for r in _rows(engine, t, fast_prefix) if "gone" in r]
    assert len(_rows(engine, "email_facts", fast_prefix)) == 2  # a and b
    # the same rows written and skipped (malformed, or of the erased email), by table
    assert counted[fast_prefix] == counted[rows_prefix]
    assert counted[fast_prefix][f"skipped {events.TOPIC_OPENS_PROCESSED}"] == 4  # 2 x (e3, bad)
    assert not _staging(engine)  # dropped by close()


class FailsOnce:
    """A chDB engine whose first statement matching ``when`` fails (after running, when
    ``after``): ClickHouse lost in the middle of the fast path."""

    def __init__(self, engine: Engine, when: str, after: bool) -> None:
        self.engine, self.when, self.after = engine, when, after
        self.failed = False

    def _maybe_fail(self, sql: str, run: Any) -> Any:
        if self.failed or self.when not in sql:
            return run()
        self.failed = True
        if self.after:
            run()
        raise RuntimeError("chDB query failed: connection lost (injected)")

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._maybe_fail(sql, lambda: self.engine.query(sql, params))

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._maybe_fail(sql, lambda: self.engine.execute(sql, params))

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.engine.insert(table, columns, rows)

    def close(self) -> None:
        """The fixture owns the engine."""


@pytest.mark.parametrize("warehouse_engine", ["chdb"], indirect=True)
@pytest.mark.parametrize(("when", "after", "attempts_counted"), [
    ("INSERT INTO loader_stage_opens ", True, 1),  # the rows are in, their counts not yet
    ("SELECT 'emails.sent' AS topic", False, 1),  # every topic in, not counted
    ("INSERT INTO loader_stage_touched", True, 1),  # the emails kept, the facts not
    # counted, the facts not refreshed: the rows were written twice, and are counted so,
    # as the row builders count a batch whose facts refresh failed
    ("INSERT INTO email_facts", False, 2),
])
def test_a_batch_that_fails_half_way_is_written_once_by_the_retry(
    warehouse_engine: Engine, when: str, after: bool, attempts_counted: int
) -> None:
    engine = warehouse_engine
    prefix = f"lfail{uuid.uuid4().hex[:6]}-"
    reference = f"lref{prefix[5:]}"
    batch = _batches(prefix)[0]
    failing = FailsOnce(engine, when, after)
    loader = Loader(failing, "unused:9092", fast=True)
    before = _counters()
    try:
        assert loader.write(batch)
    finally:
        loader.close()
    assert failing.failed, "nothing failed: the test proves nothing"
    counted = _delta(before)
    loader = Loader(engine, "unused:9092", fast=False)
    before = _counters()
    assert loader.write(_batches(reference)[0])
    for table in TABLES:
        assert _rows(engine, table, prefix) == _rows(engine, table, reference), table
        assert _rows(engine, table, prefix), table
    # the failed attempt's counts do not stay beside the retry's
    written = {k: v for k, v in counted.items() if k.startswith("rows")}
    assert written == {k: v * attempts_counted for k, v in _delta(before).items()
                       if k.startswith("rows")}
    assert not _staging(engine)


@pytest.mark.parametrize("warehouse_engine", ["chdb"], indirect=True)
def test_full_batches_leave_the_facts_to_a_later_refresh(warehouse_engine: Engine) -> None:
    """Under a backlog (full batches) the facts wait, and offsets with them (``settled``);
    a batch after ``facts_lag``, a batch that is not full, or ``settle`` refreshes the facts
    of every email written since, to what the row builders give."""
    engine = warehouse_engine
    run = uuid.uuid4().hex[:6]
    late, reference = f"llate{run}-", f"llref{run}-"
    rows = Loader(engine, "unused:9092", fast=False)
    for batch in _batches(reference):
        assert rows.write(batch)
    loader = Loader(engine, "unused:9092", fast=True, max_records=2, facts_lag=3600)
    try:
        assert loader.settled  # nothing written yet
        first, second = _batches(late)
        assert loader.write(first)  # full: more than max_records
        assert not loader.settled
        assert _rows(engine, "email_facts", late) == []
        assert _rows(engine, "opens", late)  # the rows are in at once
        assert loader.write(second)  # (its malformed values take the row builders)
        assert not loader.settled
        assert loader.settle() and loader.settled
        for table in TABLES:
            assert _rows(engine, table, late) == _rows(engine, table, reference), table
    finally:
        loader.close()
    # the lag passed: the next full batch refreshes
    again, eager = f"llagn{run}-", Loader(engine, "unused:9092", fast=True, max_records=2,
                                         facts_lag=0)
    try:
        assert eager.write(_batches(again)[0]) and eager.settled
        assert len(_rows(engine, "email_facts", again)) == 3  # a, b and gone (not erased yet)
        assert eager.write(_batches(again)[1][:1]) and eager.settled  # not full
    finally:
        eager.close()
    # what Loader.run knows of the backlog decides, whatever the batch's size
    told = f"lltld{run}-"
    told_loader = Loader(engine, "unused:9092", fast=True, max_records=1000, facts_lag=3600)
    try:
        first, second = _batches(told)
        assert told_loader.write(first, backlog=True) and not told_loader.settled
        assert told_loader.write(second, backlog=False) and told_loader.settled
        assert _rows(engine, "email_facts", told) == _rows(engine, "email_facts", reference)
    finally:
        told_loader.close()


@dataclass
class _Record:
    offset: int


def test_a_backlog_is_a_full_poll_or_records_behind_the_last_polled() -> None:
    ends = {"a": 10, "b": 3, "c": None}  # next offsets as the last fetch reported them
    polled = {"a": [_Record(8), _Record(9)], "b": [_Record(2)]}
    assert not is_backlog(polled, ends.get, max_records=10)  # read to the end of both
    assert is_backlog(polled, ends.get, max_records=3)  # full
    assert is_backlog({"a": [_Record(7), _Record(8)]}, ends.get, max_records=10)
    assert not is_backlog({"c": [_Record(0)]}, ends.get, max_records=10)  # end not known
    assert not is_backlog({}, ends.get, max_records=10)


@pytest.mark.timeout(180)
def test_a_backlog_comes_in_full_polls_on_a_real_broker(kafka_broker: Any) -> None:
    """With the loader's consumer, a backlog comes in polls of ``max_records`` (Kafka's
    default fetch size gave about 12k records a poll from 4 partitions) that are known as
    a backlog, the last one not: the facts wait while more is behind."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    from tests.test_loader_assignment import wait_topic_known

    topic, total = f"backlog-{uuid.uuid4().hex[:8]}", 60_000
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    admin.create_topics([NewTopic(topic, 4, 1)])
    admin.close()
    wait_topic_known(kafka_broker.bootstrap, topic)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, linger_ms=20,
                             batch_size=256 * 1024)
    value = events.ProcessedOpen(f"{uuid.uuid4()}", uuid.uuid4().hex, 1_767_603_600_000,
                                 "human", "", True, "f" * 16, "Chrome", "Windows",
                                 "Other").to_bytes()
    for n in range(total):
        producer.send(topic, key=str(n).encode(), value=value)
    producer.flush()
    producer.close()
    loader = Loader(None, kafka_broker.bootstrap, group_id=topic,  # type: ignore[arg-type]
                    topics=[topic], max_records=20_000)
    consumer = loader._consumer()
    sizes: list[int] = []
    verdicts: list[bool] = []
    try:
        deadline = time.monotonic() + 120
        while sum(sizes) < total and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=loader.max_records)
            if polled:
                sizes.append(sum(len(records) for records in polled.values()))
                verdicts.append(is_backlog(polled, consumer.highwater, loader.max_records))
    finally:
        consumer.close()
    assert sum(sizes) == total, sizes
    assert max(sizes) == loader.max_records, sizes
    assert verdicts[0] and not verdicts[-1], (sizes, verdicts)


@pytest.mark.parametrize("error", ["RebalanceInProgressError", "CommitFailedError",
                                   "NodeNotReadyError"])
def test_a_failed_commit_leaves_the_batches_to_be_delivered_again(error: str) -> None:
    """Seen in CI: kafka-python raised RebalanceInProgressError from a commit, which
    stopped the loader; the batches since the last commit come again instead."""
    import kafka.errors

    class Consumer:
        def commit(self) -> None:
            raise getattr(kafka.errors, error)("injected")

    Loader._commit(Consumer())

"""The CRM's guarantees under real traffic: the Opened folder paged over HTTP while opens keep
arriving, erasure that leaves nothing of a person in any table (chDB and ClickHouse server),
and the loader absorbing redelivered messages and a retried, half-written batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from opentrack.events import (
    TOPIC_ERASURES,
    EmailState,
    Engagement,
    Event,
    ProcessedOpen,
    SendRegistered,
)
from tests.conftest import RunningStack
from tests.test_backbone import CHROME, OUTLOOK, load
from tests.test_classify import THUNDERBIRD
from tests.test_crm_api import changelog_value, uid
from warehouse import reads
from warehouse.engines import Engine, WarehouseUnavailable, reader_engine
from warehouse.loader import SINKS, Loader

STACKS = ["running_stack", "server_stack"]  # chDB embedded, Debian's ClickHouse 18.16
REOPEN_AGENTS = (OUTLOOK, THUNDERBIRD)  # other clients: their loads count as new opens


def register(stack: RunningStack, email_ids: Sequence[str], **fields: str) -> dict[str, str]:
    """Register sends in one batch; their pixel URLs by email id."""
    body = {"emails": [{"email_id": e, "profile_id": "p1", "person_type": "candidate",
                        "person_id": "c1", "template_id": "t1", "subject": "Hello",
                        "sent_at": "2026-01-05T09:00:00Z", **fields} for e in email_ids]}
    response = stack.http.post(f"{stack.base}/v1/emails/batch", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return {r["email_id"]: r["pixel_url"] for r in response.json()["emails"]}


def folder_page(stack: RunningStack, profile: str, limit: int, cursor: str | None) -> dict:
    params = {"profile_id": profile, "limit": limit, **({"cursor": cursor} if cursor else {})}
    response = stack.http.get(f"{stack.base}/v1/folders/opened", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


# -- (a) the Opened folder, paged while opens keep arriving -------------------------------
@pytest.mark.timeout(300)  # the first use of a stack starts it; the test itself takes ~20 s
@pytest.mark.parametrize("stack_name", STACKS)
def test_folder_paged_over_http_while_opens_arrive_lists_each_email_once(
    request: pytest.FixtureRequest, stack_name: str
) -> None:
    stack: RunningStack = request.getfixturevalue(stack_name)
    profile = uid("paging")
    emails = [f"{profile}-{i:02d}" for i in range(17)]
    pixels = register(stack, emails, profile_id=profile)
    for email_id in emails:  # opened in this order: the folder lists them newest first
        load(pixels[email_id], CHROME)
        time.sleep(0.005)
    for email_id in emails:
        stack.wait_for(email_id, lambda s: s["opened"], timeout=60)
    time.sleep(reads.FOLDER_SETTLE_MS / 1000 + 0.5)  # the first page's snapshot holds them all

    open_counts = dict.fromkeys(emails, 1)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = folder_page(stack, profile, 5, cursor)
        seen += [item["email_id"] for item in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
        # Before the next page: an email already listed and one not listed yet are opened
        # again by another client, and a new email of the profile is opened; all of it
        # reaches the warehouse before the next page is asked for.
        unlisted = [e for e in emails if e not in seen]
        reopened = [seen[-1], unlisted[-1]]  # the last listed, the next to list
        for email_id in reopened:
            load(pixels[email_id], REOPEN_AGENTS[open_counts[email_id] - 1])
            open_counts[email_id] += 1
        newcomer = uid(profile)
        load(register(stack, [newcomer], profile_id=profile)[newcomer], CHROME)
        for email_id in reopened:
            stack.wait_for(email_id, lambda s, n=open_counts[email_id]: s["open_count"] == n)
        stack.wait_for(newcomer, lambda s: s["opened"])
    assert seen == emails[::-1]  # each once, in the order of the snapshot, no newcomer


# -- (b) erasure leaves nothing of the person -----------------------------------------------
def person_rows(engine: Engine, person_id: str, email_ids: Sequence[str]) -> dict[str, int]:
    """Rows that still name the person or one of their emails, in every table that has an
    ``email_id`` or a ``person_id`` column (raw rows: no FINAL, nothing waits for a merge).
    ``erased_emails`` is left out: it keeps the erased ids, by design, and nothing else."""
    columns = engine.query(
        "SELECT table, name FROM system.columns WHERE database = currentDatabase() "
        "AND name IN ('email_id', 'person_id') AND table != 'erased_emails'")
    found: dict[str, int] = {}
    for column in columns:
        condition = ("email_id IN %(ids)s" if column["name"] == "email_id"
                     else "person_id = %(person)s")
        rows = engine.query(f"SELECT count() AS n FROM {column['table']} WHERE {condition}",
                            {"ids": tuple(email_ids), "person": person_id})
        found[f"{column['table']}.{column['name']}"] = rows[0]["n"]
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stack_name", STACKS)
def test_erasure_leaves_nothing_of_the_person_in_any_table(
    request: pytest.FixtureRequest, stack_name: str
) -> None:
    stack: RunningStack = request.getfixturevalue(stack_name)
    person, other = uid("erase"), uid("stay")
    emails = [uid("gone") for _ in range(3)]
    kept = uid("kept")
    pixels = register(stack, emails, person_type="contact", person_id=person)
    pixels |= register(stack, [kept], person_type="contact", person_id=other)
    for url in pixels.values():
        load(url, CHROME)
        load(url, OUTLOOK)
    reply = {"email_id": emails[0], "at": "2026-01-05T10:00:00Z"}
    assert stack.http.post(f"{stack.base}/v1/events/replies", json=reply,
                           timeout=10).status_code < 300
    for email_id in [*emails, kept]:
        stack.wait_for(email_id, lambda s: s["raw_load_count"] == 2, timeout=60)
    stack.wait_for(emails[0], lambda s: s["replied"])

    engine = reader_engine(stack.settings.clickhouse_url, stack.settings.warehouse_socket)
    try:
        before = person_rows(engine, person, emails)
        assert before["sends.person_id"] == 3 and before["opens.email_id"] >= 6
        response = stack.http.delete(f"{stack.base}/v1/people/contact/{person}", timeout=60)
        assert response.status_code == 200, response.text
        assert sorted(response.json()["emails"]) == sorted(emails)
        assert set(person_rows(engine, person, emails).values()) == {0}, before
        erased = engine.query("SELECT * FROM erased_emails WHERE email_id IN %(ids)s",
                              {"ids": tuple(emails)})
        assert {tuple(sorted(r)) for r in erased} == {("email_id", "erased_at")}

        load(pixels[emails[1]], THUNDERBIRD)  # a late load of an erased email
        time.sleep(2.0)
        assert set(person_rows(engine, person, emails).values()) == {0}
        assert stack.opens(emails[1]).status_code == 404
        assert stack.opens(kept).json()["raw_load_count"] == 2  # the other person stays
    finally:
        engine.close()
    for email_id in emails:  # the stream state keeps only the fact
        assert changelog_value(stack.settings.bootstrap, email_id) == b'{"erased":true}'


# -- (c) redelivered messages and a retried, half-written batch ---------------------------
class FailsOnceMidBatch:
    """A real engine that refuses one insert once, after another table of the same batch
    took its rows: what a ClickHouse outage in the middle of a batch does to the loader."""

    def __init__(self, engine: Engine, email_id: str) -> None:
        self.engine = engine
        self.email_id = email_id
        self.written_tables: set[str] = set()
        self.failed = False

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        ours = any(self.email_id in row for row in rows)
        if ours and not self.failed and self.written_tables - {table}:
            self.failed = True
            raise WarehouseUnavailable("connection lost in the middle of a batch")
        self.engine.insert(table, columns, rows)
        if ours:
            self.written_tables.add(table)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.engine.query(sql, params)

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self.engine.execute(sql, params)

    def close(self) -> None:
        """The fixture owns the engine."""


def start_group_at_end(bootstrap: str, group_id: str, topics: Sequence[str]) -> None:
    """Commit the group's offsets at the current end: a new loader then reads only what
    comes next, not what other tests published on the shared broker."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id,
                             enable_auto_commit=False)
    partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)]
    consumer.assign(partitions)
    consumer.seek_to_end(*partitions)
    consumer.commit({tp: OffsetAndMetadata(consumer.position(tp), "", -1) for tp in partitions})
    consumer.close()


def wait_committed(bootstrap: str, group_id: str, published: dict[TopicPartition, int],
                   timeout: float = 30) -> None:
    """Until the group has committed past every published offset."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = admin.list_group_offsets(group_id)[group_id]
            if all(tp in committed and committed[tp].offset > offset
                   for tp, offset in published.items()):
                return
            time.sleep(0.1)
    finally:
        admin.close()
    raise AssertionError(f"the loader did not commit {published} in {timeout}s")


def publish(bootstrap: str, messages: Sequence[Event], times: int) -> dict[TopicPartition, int]:
    """Each message ``times`` times in a row (a redelivery); the last offset per partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    futures = [producer.send(m.topic, key=m.key.encode(), value=m.to_bytes())
               for _ in range(times) for m in messages]
    producer.flush()
    producer.close()
    last: dict[TopicPartition, int] = {}
    for future in futures:
        meta = future.get(timeout=10)
        tp = TopicPartition(meta.topic, meta.partition)
        last[tp] = max(last.get(tp, -1), meta.offset)
    return last


def table_counts(engine: Engine, email_id: str) -> dict[str, int]:
    tables = [table for table, *_ in SINKS.values()]
    return {table: engine.query(f"SELECT count() AS n FROM {table} FINAL WHERE email_id = %(e)s",
                                {"e": email_id})[0]["n"] for table in tables}


@pytest.mark.timeout(120)
def test_loader_absorbs_redelivered_messages_and_a_retried_half_written_batch(
    kafka_broker: Any, warehouse_engine: Engine
) -> None:
    email_id, t0 = uid("redeliver"), 1_767_603_600_000
    loads = [ProcessedOpen(f"{email_id}-ev{i}", email_id, t0 + i * 120_000, "human", "",
                           True, f"fp{i}", "Outlook", "Windows", "Other", revision=i + 1)
             for i in range(3)]
    messages: list[Event] = [
        SendRegistered(email_id, "p1", "candidate", "c1", "t1", "Hello", t0, registered_at=t0),
        *loads,
        EmailState(email_id, True, 2, 2, 0, 2, t0, t0 + 120_000, t0 + 120_000, revision=2),
        EmailState(email_id, True, 3, 3, 0, 3, t0, t0 + 240_000, t0 + 240_000, revision=3),
        Engagement(f"{email_id}-reply", email_id, "reply", t0 + 600_000),
    ]
    group = uid("loader-test")
    start_group_at_end(kafka_broker.bootstrap, group, [*SINKS, TOPIC_ERASURES])
    engine = FailsOnceMidBatch(warehouse_engine, email_id)
    loader = Loader(engine, kafka_broker.bootstrap, group_id=group)
    runner = threading.Thread(target=loader.run, name="test-loader", daemon=True)
    runner.start()
    try:
        # every message twice (a redelivery), then the whole set again with an older state
        # arriving last (a late redelivery of revision 2)
        wait_committed(kafka_broker.bootstrap, group, publish(kafka_broker.bootstrap,
                                                              messages, times=2))
        assert engine.failed, "the batch never failed half-way: the test proves nothing"
        wait_committed(kafka_broker.bootstrap, group, publish(kafka_broker.bootstrap,
                                                              [*messages, messages[4]], times=1))
    finally:
        loader.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert table_counts(warehouse_engine, email_id) == {
        "sends": 1, "opens": 3, "email_state": 1, "engagement": 1}
    state = reads.email_opens(warehouse_engine, email_id)
    assert state is not None
    assert (state["open_count"], state["raw_load_count"], state["replies"]) == (3, 3, 1)
    assert state["last_opened_at"] == "2026-01-05T09:04:00.000Z"

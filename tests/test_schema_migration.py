"""Migration 4 (small index granules for the tables read by key), on chDB and on 18.16.

A warehouse with data at version 3 is rebuilt table by table (ClickHouse cannot change a
table's index_granularity): every row and every read answer must stay the same, the
materialized view must feed the rebuilt sends_by_person, and a crash at any step must be
repaired by the next ``migrate()``. Migration 5 then fills the folder index from the
states: the migrated warehouse answers as one made at the latest version with the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from opentrack.events import EmailState, Engagement, ProcessedOpen, SendRegistered
from tests.test_analytics_world import new_tag
from tests.test_email_facts import fresh_database
from warehouse import reads
from warehouse.engines import Engine
from warehouse.loader import rows_by_table, write_batch
from warehouse.schema import (
    LATEST,
    MIGRATIONS,
    SMALL_BLOCK_TABLES,
    SMALL_GRANULE_TABLES,
    SMALL_GRANULES,
    migrate,
    small_block_settings,
)

T0 = 1_767_603_600_000  # 2026-01-05T09:00:00Z
MIN = 60_000
ALL_TABLES = (*SMALL_GRANULE_TABLES, "email_facts", "erased_emails", "sends_by_profile")
STEPS = {version: steps for version, _, steps in MIGRATIONS}[4]
copy_step, swap_step, drop_step = STEPS


def write(engine: Engine, *events: Any) -> None:
    """Through the loader's write path (rows per table, then ``write_batch``)."""
    write_batch(engine, rows_by_table((e.topic, e.to_bytes()) for e in events))


def fill(engine: Engine, tag: str) -> dict[str, Any]:
    """Three people's emails: opened by people and machines, replied to, unsubscribed,
    states written more than once (old revisions, a retried batch), one state rewritten
    under the same revision (which of equal versions wins must survive the copy)."""
    people = [("candidate", f"{tag}-c1"), ("candidate", f"{tag}-c2"), ("contact", f"{tag}-k1")]
    email_ids, events = [], []
    for n in range(24):
        email_id = f"{tag}-e{n:02d}"
        email_ids.append(email_id)
        person_type, person_id = people[n % 3]
        sent = T0 + n * 7 * MIN
        send = SendRegistered(email_id, f"{tag}-p{n % 2}", person_type, person_id,
                              f"t{n % 4}", f"subject {n % 3}", sent,
                              sequence_id="seq-1" if n % 2 else None,
                              sequence_step=n % 5 + 1 if n % 2 else None,
                              tracking=n % 11 != 10, registered_at=sent + 3)
        events.append(send)
        if n % 4 != 3:  # opened
            machine = n % 5 == 0
            first, last = sent + 2 * MIN, sent + (40 + n) * MIN
            events += [
                ProcessedOpen(f"{email_id}-o1", email_id, first,
                              "machine" if machine else "human", "apple_mpp" if machine else "",
                              True, "fp1", revision=1),
                EmailState(email_id, True, 1, 0 if machine else 1, int(machine), 1, first,
                           first, None if machine else first, revision=1,
                           first_human_opened_at=None if machine else first),
                ProcessedOpen(f"{email_id}-o2", email_id, last, "human", "", True, "fp2",
                              revision=2),
                EmailState(email_id, True, 2, 1 if machine else 2, int(machine), 2, first,
                           last, last, revision=2,
                           first_human_opened_at=last if machine else first),
            ]
        if n % 6 == 1:
            events.append(Engagement(f"{email_id}-r", email_id, "reply", sent + 90 * MIN))
        if n % 9 == 4:
            events.append(Engagement(f"{email_id}-u", email_id, "unsubscribe", sent + 99 * MIN))
    write(engine, *events[:len(events) // 2])  # two batches: two parts per table
    write(engine, *events[len(events) // 2:])
    write(engine, *events[len(events) // 2:])  # a retried batch
    write(engine, *[SendRegistered(email_ids[0], f"{tag}-p0", *people[0], "t0", "subject 0",
                                   T0, registered_at=T0 + 3)])  # a redelivered send
    # the same revision again, the first human open now known: of equal versions the last
    # inserted is the one read
    write(engine, EmailState(email_ids[1], True, 2, 2, 0, 2, T0 + 9 * MIN, T0 + 48 * MIN,
                             T0 + 48 * MIN, revision=2, first_human_opened_at=T0 + 8 * MIN))
    write(engine, EmailState(email_ids[2], True, 1, 1, 0, 1, T0, T0, T0, revision=1))  # late
    return {"email_ids": email_ids, "people": people, "profiles": [f"{tag}-p0", f"{tag}-p1"]}


def walk(read: Callable[..., reads.Page], **kw: Any) -> list[dict[str, Any]]:
    """Every page of a paged read, three emails a page."""
    items, cursor = [], None
    while True:
        page = read(limit=3, cursor=cursor, **kw)
        items += page.items
        if page.next_cursor is None:
            return items
        cursor = page.next_cursor


def answers(engine: Engine, data: dict[str, Any]) -> dict[str, Any]:
    """What the CRM API reads, and every row as reads see it (FINAL), of every table."""
    out: dict[str, Any] = {
        "states": {i: reads.email_opens(engine, i) for i in data["email_ids"]},
        "folder": walk(lambda **kw: reads.opened_folder(engine, **kw)),
        "folder_all_loads": walk(lambda **kw: reads.opened_folder(engine, **kw),
                                 human_only=False),
        "person": {p: walk(lambda p=p, **kw: reads.person_emails(engine, *p, **kw))
                   for p in data["people"]},
    }
    for profile in data["profiles"]:
        out[profile] = walk(lambda **kw: reads.opened_folder(engine, **kw), profile_id=profile)
    for table in ALL_TABLES:
        rows = engine.query(f"SELECT * FROM {table} FINAL")
        out[table] = sorted(tuple(sorted(r.items())) for r in rows)
    return out


def structure(engine: Engine) -> dict[str, Any]:
    """Columns (types, defaults), engine, sorting and partition keys of every table."""
    columns: dict[str, list[tuple[str, ...]]] = {}
    for r in engine.query(  # in the table's order (18.16 has no system.columns.position)
            "SELECT table, name, type, default_kind, default_expression FROM system.columns "
            "WHERE database = currentDatabase()"):
        columns.setdefault(r["table"], []).append(
            (r["name"], r["type"], r["default_kind"], r["default_expression"]))
    tables = engine.query(
        "SELECT name, engine, sorting_key, partition_key, primary_key FROM system.tables "
        "WHERE database = currentDatabase() ORDER BY name")
    return {"columns": columns, "tables": tables}


def engine_clauses(engine: Engine) -> dict[str, str]:
    return {r["name"]: r["engine_full"] for r in engine.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()")}


LATER_TABLES = ("folder_index", "folder_index_mv",  # made by migration 5
                "sends_by_profile", "sends_by_profile_mv",  # 6
                "email_lookup", "email_lookup_sends_mv", "email_lookup_states_mv",  # and 7
                "email_lookup_engagement_mv")


def structure_before_4(engine: Engine) -> dict[str, Any]:
    found = structure(engine)
    return {"columns": {t: c for t, c in found["columns"].items() if t not in LATER_TABLES},
            "tables": [t for t in found["tables"] if t["name"] not in LATER_TABLES]}


@pytest.fixture
def v3(warehouse_engine) -> Iterator[tuple[Engine, dict[str, Any], dict[str, Any]]]:
    """A fresh warehouse at version 3 with data, its structure, and the answers of a
    warehouse made at the latest version with the same data (today's reads need the folder
    index of migration 5)."""
    tag = new_tag("m4")
    with fresh_database(warehouse_engine) as reference:
        migrate(reference)
        expected = answers(reference, fill(reference, tag))
    assert len(expected["states"]) == 24 and len(expected["folder"]) == 18
    with fresh_database(warehouse_engine) as engine:
        assert migrate(engine, upto=3) == [1, 2, 3]
        data = fill(engine, tag)
        yield engine, data, {"answers": expected, "structure": structure_before_4(engine)}


def assert_migrated(engine: Engine, data: dict[str, Any], before: dict[str, Any]) -> None:
    clauses = engine_clauses(engine)
    leftovers = sorted(name for name in clauses if "__m4_" in name)
    assert leftovers == []
    blocks = small_block_settings(engine)  # chDB: the block sizes too; 18.16: none
    assert bool(blocks) == ("max_compress_block_size" in str(engine.query(
        "SELECT name FROM system.merge_tree_settings")))
    for table in SMALL_GRANULE_TABLES:
        assert f"index_granularity = {SMALL_GRANULES}" in clauses[table], clauses[table]
        for name, value in blocks.items():
            assert (f"{name} = {value}" in clauses[table]) == (table in SMALL_BLOCK_TABLES)
    assert "index_granularity = 8192" in clauses["email_facts"]
    assert structure_before_4(engine) == before["structure"]
    assert answers(engine, data) == before["answers"]
    assert engine.query("SELECT max(version) AS v FROM schema_migrations")[0]["v"] == LATEST
    assert migrate(engine) == []  # a second run is a no-op
    assert engine_clauses(engine) == clauses

    # the view still fills the rebuilt sends_by_person from the rebuilt sends
    person = data["people"][0]
    late = SendRegistered(f"{person[1]}-late", data["profiles"][0], *person, "t9", "late",
                          T0 + 999 * MIN, registered_at=T0 + 999 * MIN)
    write(engine, late)
    newest = reads.person_emails(engine, *person, limit=1).items
    assert [item["email_id"] for item in newest] == [late.email_id]
    assert engine.query("SELECT count() AS n FROM sends_by_person WHERE email_id = %(e)s",
                        {"e": late.email_id})[0]["n"] == 1
    # and the folder index's view sees the new states
    opened_at = T0 + 1000 * MIN
    write(engine, EmailState(late.email_id, True, 1, 1, 0, 1, opened_at, opened_at, opened_at,
                             revision=1, first_human_opened_at=opened_at))
    first = reads.opened_folder(engine, limit=1).items
    assert [item["email_id"] for item in first] == [late.email_id]
    # and the profile's, from sends_by_profile, which the view fills too
    first = reads.opened_folder(engine, profile_id=data["profiles"][0], limit=1).items
    assert [item["email_id"] for item in first] == [late.email_id]


def test_migration_4_keeps_rows_and_answers(v3) -> None:
    engine, data, before = v3
    clauses = engine_clauses(engine)
    assert all("index_granularity = 8192" in clauses[t] for t in SMALL_GRANULE_TABLES)
    assert migrate(engine) == [4, 5, 6, 7]
    assert_migrated(engine, data, before)


def _half_written_copy(engine: Engine) -> None:
    """The copy step, then a crash during the INSERT of one table's copy."""
    copy_step(engine)
    engine.execute("DROP TABLE sends__m4_new")
    engine.execute("CREATE TABLE sends__m4_new AS sends ENGINE = ReplacingMergeTree("
                   "registered_at) ORDER BY email_id "
                   f"SETTINGS index_granularity = {SMALL_GRANULES}")
    engine.execute("INSERT INTO sends__m4_new SELECT * FROM sends LIMIT 2")


def _between_the_renames(engine: Engine) -> None:
    """A crash after ``RENAME sends TO old`` and before ``RENAME new TO sends``, the view
    dropped already."""
    copy_step(engine)
    engine.execute("DROP TABLE sends_by_person_mv")
    engine.execute("RENAME TABLE email_state TO email_state__m4_old, "
                   "email_state__m4_new TO email_state")
    engine.execute("RENAME TABLE sends TO sends__m4_old")


@pytest.mark.parametrize("crash", [
    pytest.param(lambda e: copy_step(e), id="after-copy"),
    pytest.param(_half_written_copy, id="half-written-copy"),
    pytest.param(_between_the_renames, id="between-renames"),
    pytest.param(lambda e: (copy_step(e), swap_step(e)), id="after-swap"),
    pytest.param(lambda e: (copy_step(e), swap_step(e), drop_step(e)), id="before-record"),
])
def test_migration_4_after_a_crash(v3, crash: Callable[[Engine], Any]) -> None:
    engine, data, before = v3
    crash(engine)
    assert migrate(engine) == [4, 5, 6, 7]
    assert_migrated(engine, data, before)

"""Schema, idempotent writes and reads, the same on chDB and on a ClickHouse server."""

from __future__ import annotations

import uuid

from opentrack.events import EmailState, Engagement, ProcessedOpen, SendRegistered
from warehouse import reads
from warehouse.loader import rows_by_table, write_batch
from warehouse.schema import LATEST, SMALL_GRANULE_TABLES, SMALL_GRANULES, migrate

SENT = 1_767_603_600_000  # 2026-01-05T09:00:00Z


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def batch(*events) -> dict:
    return rows_by_table((e.topic, e.to_bytes()) for e in events)


def send(email_id: str, **kw) -> SendRegistered:
    fields = dict(profile_id="p1", person_type="candidate", person_id="c1", template_id="t1",
                  subject="Hello", sent_at=SENT, registered_at=SENT + 5)
    fields.update(kw)
    return SendRegistered(email_id=email_id, **fields)


def state(email_id: str, revision: int, opens: int) -> EmailState:
    return EmailState(email_id, opened=opens > 0, open_count=opens, human_open_count=opens,
                      raw_load_count=opens + 1, first_opened_at=SENT + 60_000 if opens else None,
                      last_opened_at=SENT + 60_000 * opens if opens else None,
                      last_human_opened_at=SENT + 60_000 * opens if opens else None,
                      revision=revision)


def test_migrations_are_idempotent(warehouse_engine) -> None:
    assert migrate(warehouse_engine) == []
    versions = warehouse_engine.query("SELECT max(version) AS v FROM schema_migrations")
    assert versions[0]["v"] == LATEST


def test_tables_read_by_key_have_small_granules(warehouse_engine) -> None:
    """A new warehouse gets them too (migration 4 rebuilds the tables 1 made, empty)."""
    clauses = {r["name"]: r["engine_full"] for r in warehouse_engine.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()")}
    for table in SMALL_GRANULE_TABLES:
        assert f"SETTINGS index_granularity = {SMALL_GRANULES}" in clauses[table]
    assert not [name for name in clauses if "__m4_" in name]


def test_state_with_send_metadata(warehouse_engine) -> None:
    email_id = uid("wh")
    write_batch(warehouse_engine, batch(
        send(email_id, sequence_id="seq-1", sequence_step=2), state(email_id, 3, 2)))
    got = reads.email_opens(warehouse_engine, email_id)
    assert got == {
        "email_id": email_id, "profile_id": "p1", "person_type": "candidate",
        "person_id": "c1", "template_id": "t1", "subject": "Hello", "sequence_id": "seq-1",
        "sequence_step": 2, "sent_at": "2026-01-05T09:00:00.000Z", "tracking": True,
        "opened": True, "open_count": 2, "human_open_count": 2, "machine_open_count": 0,
        "raw_load_count": 3, "first_opened_at": "2026-01-05T09:01:00.000Z",
        "last_opened_at": "2026-01-05T09:02:00.000Z",
        "last_human_opened_at": "2026-01-05T09:02:00.000Z",
        "replies": 0, "replied": False, "unsubscribes": 0, "unsubscribed": False,
    }


def test_registered_but_unopened_and_unknown(warehouse_engine) -> None:
    email_id = uid("wh")
    write_batch(warehouse_engine, batch(send(email_id)))
    got = reads.email_opens(warehouse_engine, email_id)
    assert got["opened"] is False and got["open_count"] == 0 and got["last_opened_at"] is None
    assert got["sequence_id"] is None and got["sequence_step"] is None
    assert reads.email_opens(warehouse_engine, uid("never")) is None


def test_retried_batches_and_old_revisions_change_nothing(warehouse_engine) -> None:
    email_id = uid("wh")
    newest = state(email_id, 5, 3)
    opened = ProcessedOpen("ev-1", email_id, SENT + 60_000, "human", "", True, "fp")
    reply = Engagement("r-1", email_id, "reply", SENT + 120_000)
    rows = batch(send(email_id), newest, opened, reply)
    for _ in range(3):  # a retried batch / a redelivered message / a replay
        write_batch(warehouse_engine, rows)
    write_batch(warehouse_engine, batch(state(email_id, 4, 2)))  # late, older revision
    assert reads.email_opens(warehouse_engine, email_id)["open_count"] == 3
    counts = warehouse_engine.query(
        """SELECT (SELECT count() FROM sends FINAL WHERE email_id = %(e)s) AS sends,
                  (SELECT count() FROM opens FINAL WHERE email_id = %(e)s) AS opens,
                  (SELECT count() FROM engagement FINAL WHERE email_id = %(e)s) AS engagement,
                  (SELECT count() FROM email_state FINAL WHERE email_id = %(e)s) AS states""",
        {"e": email_id},
    )
    assert counts == [{"sends": 1, "opens": 1, "engagement": 1, "states": 1}]


def test_malformed_messages_are_skipped_not_fatal(warehouse_engine) -> None:
    email_id = uid("wh")
    rows = rows_by_table([("emails.sent", b"{not json"), ("email_state", b'{"x": 1}'),
                          ("email_state", b'{"email_id": "e", "open_count": "many"}'),
                          ("engagement.raw", Engagement("e", email_id, "bounce", 1).to_bytes()),
                          ("emails.sent", send(email_id).to_bytes())])
    assert {t: len(r) for t, r in rows.items() if r} == {"sends": 1}
    write_batch(warehouse_engine, rows)
    assert reads.email_opens(warehouse_engine, email_id) is not None


def test_parameters_are_escaped_not_interpolated(warehouse_engine) -> None:
    hostile = "x' OR 1=1 --"
    write_batch(warehouse_engine, batch(send(uid("wh"), subject=hostile)))
    assert reads.email_opens(warehouse_engine, hostile) is None
    rows = warehouse_engine.query("SELECT count() AS n FROM sends WHERE subject = %(s)s",
                                  {"s": hostile})
    assert rows[0]["n"] >= 1

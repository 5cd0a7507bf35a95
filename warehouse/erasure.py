"""Erasure of a person's data from the warehouse.

The web answers DELETE /v1/people/... by publishing an ``Erasure`` event (and tombstones of
the sends, for the stream state and for Kafka's compaction); the loader applies it, so the
process that owns the embedded warehouse is the one that writes. Erased email ids are kept
(``erased_emails``, the id only) so that rows still in flight for them are refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from opentrack.events import now_ms
from warehouse.engines import Engine

ERASABLE_TABLES = (
    "sends", "sends_by_person", "opens", "email_state", "engagement", "email_facts",
    "folder_index", "sends_by_profile", "email_lookup",
)


def person_email_ids(engine: Engine, person_type: str, person_id: str) -> list[str]:
    rows = engine.query(
        "SELECT DISTINCT email_id FROM sends_by_person FINAL "
        "WHERE person_type = %(type)s AND person_id = %(id)s",
        {"type": person_type, "id": person_id},
    )
    return sorted(r["email_id"] for r in rows)


def row_counts(engine: Engine, email_ids: Iterable[str]) -> dict[str, int]:
    """Rows each table holds for these emails."""
    ids = tuple(email_ids)
    if not ids:
        return dict.fromkeys(ERASABLE_TABLES, 0)
    selects = ", ".join(
        f"(SELECT count() FROM {table} FINAL WHERE email_id IN %(ids)s) AS {table}"
        for table in ERASABLE_TABLES
    )
    return engine.query(f"SELECT {selects}", {"ids": ids})[0]


def erase_emails(engine: Engine, email_ids: Iterable[str], timeout: float = 120.0) -> None:
    """Delete every row of these emails and remember the ids; waits for the mutations
    (ClickHouse runs them in the background; 18.16 has no ``mutations_sync``)."""
    ids = tuple(sorted(set(email_ids)))
    if not ids:
        return
    engine.insert("erased_emails", ["email_id", "erased_at"], [(i, now_ms()) for i in ids])
    for table in ERASABLE_TABLES:
        engine.execute(f"ALTER TABLE {table} DELETE WHERE email_id IN %(ids)s", {"ids": ids})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = engine.query(
            "SELECT count() AS n FROM system.mutations "
            "WHERE database = currentDatabase() AND is_done = 0"
        )
        if pending[0]["n"] == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"erasure mutations did not finish in {timeout:.0f}s")


def erased_ids(engine: Engine) -> set[str]:
    return {r["email_id"] for r in engine.query("SELECT email_id FROM erased_emails")}

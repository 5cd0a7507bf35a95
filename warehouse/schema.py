"""The warehouse schema as versioned migrations, applied in order at start.

Portable between chDB (ClickHouse 25+) and Debian's clickhouse-server 18.16: times are
Int64 epoch milliseconds (18.16 has no DateTime64), ``0`` stands for "no time" (cheaper
than Nullable), and every table is a ReplacingMergeTree whose sorting key holds a
deterministic id, so that a retried batch, a redelivered message or a replay collapses into
one row. Reads use ``FINAL`` (or argMax) so they never see the duplicates before a merge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from warehouse import facts
from warehouse.engines import Engine

log = logging.getLogger(__name__)

_MONTH = "toYYYYMM(toDateTime(intDiv({col}, 1000)))"

# A step is a statement, or a function for what one statement cannot say portably.
Step = str | Callable[[Engine], None]


def _add_first_human_opened_at(engine: Engine) -> None:
    """18.16 has no ``ADD COLUMN IF NOT EXISTS``: look first, so a rerun after a crash works."""
    present = engine.query(
        "SELECT count() AS n FROM system.columns WHERE database = currentDatabase() "
        "AND table = 'email_state' AND name = 'first_human_opened_at'")
    if not present[0]["n"]:
        engine.execute("ALTER TABLE email_state ADD COLUMN first_human_opened_at Int64 DEFAULT 0")


_STATE_COLUMNS = (
    "email_id, opened, open_count, human_open_count, machine_open_count, raw_load_count, "
    "first_opened_at, last_opened_at, last_human_opened_at, revision"
)

# States written before the worker sent first_human_opened_at get it from their own counted
# opens (what the worker computes), written again under the same revision: of equal
# versions a ReplacingMergeTree keeps the last inserted. Without it, a later refresh of such
# an email's facts would lose the time of its first human open.
_FILL_FIRST_HUMAN_OPENED_AT = f"""
    INSERT INTO email_state ({_STATE_COLUMNS}, first_human_opened_at)
    SELECT {_STATE_COLUMNS}, first_human
    FROM (
        SELECT {_STATE_COLUMNS} FROM (
            SELECT {_STATE_COLUMNS}, first_human_opened_at FROM email_state FINAL
        ) WHERE human_open_count > 0 AND first_human_opened_at = 0
    ) AS st
    ANY INNER JOIN (
        SELECT email_id, minIf(received_at, counted = 1 AND load_class != 'machine')
            AS first_human
        FROM opens FINAL GROUP BY email_id
    ) AS o USING email_id
    WHERE first_human > 0"""

MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (1, "sends, opens, email state, engagement", [
        """CREATE TABLE IF NOT EXISTS sends (
            email_id String, profile_id String, person_type String, person_id String,
            template_id String, subject String, sequence_id String, sequence_step UInt16,
            sent_at Int64, tracking UInt8, registered_at Int64
        ) ENGINE = ReplacingMergeTree(registered_at) ORDER BY email_id""",
        # Related emails of a person: the same rows sorted for that lookup.
        """CREATE TABLE IF NOT EXISTS sends_by_person (
            person_type String, person_id String, sent_at Int64, email_id String,
            registered_at Int64
        ) ENGINE = ReplacingMergeTree(registered_at)
        ORDER BY (person_type, person_id, email_id)""",
        """CREATE MATERIALIZED VIEW IF NOT EXISTS sends_by_person_mv TO sends_by_person AS
        SELECT person_type, person_id, sent_at, email_id, registered_at FROM sends""",
        f"""CREATE TABLE IF NOT EXISTS opens (
            event_id String, email_id String, received_at Int64, load_class String,
            reason String, counted UInt8, fingerprint String, client_family String,
            os_family String, device_family String, revision UInt64
        ) ENGINE = ReplacingMergeTree(revision)
        PARTITION BY {_MONTH.format(col="received_at")}
        ORDER BY (email_id, event_id)""",
        """CREATE TABLE IF NOT EXISTS email_state (
            email_id String, opened UInt8, open_count UInt32, human_open_count UInt32,
            machine_open_count UInt32, raw_load_count UInt32, first_opened_at Int64,
            last_opened_at Int64, last_human_opened_at Int64, revision UInt64
        ) ENGINE = ReplacingMergeTree(revision) ORDER BY email_id""",
        f"""CREATE TABLE IF NOT EXISTS engagement (
            event_id String, email_id String, kind String, at Int64
        ) ENGINE = ReplacingMergeTree
        PARTITION BY {_MONTH.format(col="at")}
        ORDER BY (email_id, kind, event_id)""",
    ]),
    (2, "erased emails", [
        """CREATE TABLE IF NOT EXISTS erased_emails (email_id String, erased_at Int64)
        ENGINE = ReplacingMergeTree ORDER BY email_id""",
    ]),
    (3, "per-email facts for the comparisons, filled from the tables", [
        _add_first_human_opened_at,
        _FILL_FIRST_HUMAN_OPENED_AT,
        facts.CREATE_TABLE,
        facts.rebuild,
    ]),
]

LATEST = MIGRATIONS[-1][0]


def migrate(engine: Engine, upto: int | None = None) -> list[int]:
    """Apply the migrations this warehouse lacks (up to version ``upto``, default all);
    return their versions. A migration is recorded only once all its steps ran, and every
    step can run again, so a crash half-way is repaired by the next start."""
    engine.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at Int64) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {r["version"] for r in engine.query("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, steps in MIGRATIONS:
        if version in done or (upto is not None and version > upto):
            continue
        for step in steps:
            if isinstance(step, str):
                engine.execute(step)
            else:
                step(engine)
        engine.insert(
            "schema_migrations", ["version", "name", "applied_at"],
            [(version, name, 0)],
        )
        log.info("applied warehouse migration %d: %s", version, name)
        applied.append(version)
    return applied

"""The warehouse schema as versioned migrations, applied in order at start.

Portable between chDB (ClickHouse 25+) and Debian's clickhouse-server 18.16: times are
Int64 epoch milliseconds (18.16 has no DateTime64), ``0`` stands for "no time" (cheaper
than Nullable), and every table is a ReplacingMergeTree whose sorting key holds a
deterministic id, so that a retried batch, a redelivered message or a replay collapses into
one row. Reads use ``FINAL`` (or argMax) so they never see the duplicates before a merge.
"""

from __future__ import annotations

import logging

from warehouse.engines import Engine

log = logging.getLogger(__name__)

_MONTH = "toYYYYMM(toDateTime(intDiv({col}, 1000)))"

MIGRATIONS: list[tuple[int, str, list[str]]] = [
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
]

LATEST = MIGRATIONS[-1][0]


def migrate(engine: Engine) -> list[int]:
    """Apply the migrations this warehouse lacks; return their versions."""
    engine.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at Int64) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {r["version"] for r in engine.query("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for statement in statements:
            engine.execute(statement)
        engine.insert(
            "schema_migrations", ["version", "name", "applied_at"],
            [(version, name, 0)],
        )
        log.info("applied warehouse migration %d: %s", version, name)
        applied.append(version)
    return applied

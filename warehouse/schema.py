"""The warehouse schema as versioned migrations, applied in order at start.

Portable between chDB (ClickHouse 25+) and Debian's clickhouse-server 18.16: times are
Int64 epoch milliseconds (18.16 has no DateTime64), ``0`` stands for "no time" (cheaper
than Nullable), and every table is a ReplacingMergeTree whose sorting key holds a
deterministic id, so that a retried batch, a redelivered message or a replay collapses into
one row. Reads use ``FINAL`` (or argMax) so they never see the duplicates before a merge.
"""

from __future__ import annotations

import logging
import re
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

_SENDS_BY_PERSON_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS sends_by_person_mv
        TO sends_by_person AS
        SELECT person_type, person_id, sent_at, email_id, registered_at FROM sends"""

# Rows per granule (one mark of the sparse primary index) of the tables read by key. A read
# of a few ids decompresses and filters whole granules: at ClickHouse's default of 8192 rows
# a one-email lookup read ~8k rows per column of each table, most of its time.
SMALL_GRANULES = 256
# The tables looked up by email id (or by person): the state of an email, the pages'
# emails, a person's emails, and the reopened emails' opens. Not email_facts: it is only
# scanned (the comparisons), where small granules cost a little and save nothing.
SMALL_GRANULE_TABLES = ("sends", "sends_by_person", "email_state", "engagement", "opens")
# A granule is read by decompressing the compressed block(s) it lies in: 64 KiB to 1 MiB by
# default, so 256-row granules alone save little. Where the engine takes block sizes per
# table (chDB; 18.16 has them only server-wide), the tables only read by key get blocks of
# at most 8 KiB. Not opens: its 10M rows are also scanned (reloads, replays), where small
# blocks compress worse.
SMALL_BLOCKS = {"min_compress_block_size": 1024, "max_compress_block_size": 8192}
SMALL_BLOCK_TABLES = ("sends", "sends_by_person", "email_state", "engagement")
_NEW, _OLD = "{}__m4_new", "{}__m4_old"


def _tables(engine: Engine) -> dict[str, str]:
    """This database's tables and their engine clauses (``engine_full``: ``ReplacingMergeTree
    (v) PARTITION BY ... ORDER BY ... SETTINGS index_granularity = 8192`` on 18.16 as on
    chDB; empty for views)."""
    return {r["name"]: r["engine_full"] for r in engine.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()")}


def _granularity(engine_full: str) -> int:
    found = re.search(r"\bindex_granularity = (\d+)", engine_full)
    return int(found.group(1)) if found else 8192


def small_block_settings(engine: Engine) -> dict[str, int]:
    """``SMALL_BLOCKS``, if this engine takes them as table settings (else none)."""
    known = {r["name"] for r in engine.query(
        "SELECT name FROM system.merge_tree_settings WHERE name IN %(names)s",
        {"names": tuple(SMALL_BLOCKS)})}
    return SMALL_BLOCKS if known == set(SMALL_BLOCKS) else {}


def _with_granularity(engine_full: str, rows: int, extra: dict[str, int]) -> str:
    setting = ", ".join(f"{k} = {v}" for k, v in {"index_granularity": rows, **extra}.items())
    if re.search(r"\bindex_granularity = \d+", engine_full):
        return re.sub(r"\bindex_granularity = \d+", setting, engine_full)
    if " SETTINGS " in engine_full:
        return f"{engine_full}, {setting}"
    return f"{engine_full} SETTINGS {setting}"


def _copy_with_small_granules(engine: Engine) -> None:
    """Step 1 of 3: beside each table lacking the setting, ``<table>__m4_new``: the same
    columns (``CREATE TABLE ... AS``), the same engine clause (version column, PARTITION BY,
    ORDER BY) but small granules, holding the table's rows. ClickHouse cannot change a
    table's index_granularity, so the table is rebuilt.

    The rows are copied with FINAL: what every read sees, and what a merge would keep. A
    plain copy could reorder rows of one key with equal versions, of which a
    ReplacingMergeTree keeps the last inserted (migration 3 relies on it), and change
    which one reads see.

    Rerun: a half-written copy (a crash during the INSERT) is dropped and made again; a
    table swapped already (it has the setting) or half-swapped (it is missing: the crash
    came between the renames of step 2) needs no copy."""
    tables = _tables(engine)
    blocks = small_block_settings(engine)
    for table in SMALL_GRANULE_TABLES:
        if table not in tables or _granularity(tables[table]) == SMALL_GRANULES:
            continue
        new = _NEW.format(table)
        extra = blocks if table in SMALL_BLOCK_TABLES else {}
        engine.execute(f"DROP TABLE IF EXISTS {new}")
        engine.execute(f"CREATE TABLE {new} AS {table} "
                       f"ENGINE = {_with_granularity(tables[table], SMALL_GRANULES, extra)}")
        engine.execute(f"INSERT INTO {new} SELECT * FROM {table} FINAL")


def _swap_in_small_granules(engine: Engine) -> None:
    """Step 2 of 3: each copy takes its table's name, the table moves to ``<table>__m4_old``;
    then the materialized view that fills sends_by_person from sends is made again: chDB
    keeps a view bound to the tables it was created on through a RENAME (the new sends
    would no longer reach sends_by_person once the old tables are dropped); 18.16 binds it
    by name, where making it again changes nothing.

    Rerun: a table already swapped is skipped; one whose rename ran but not its copy's
    (``RENAME a TO b, c TO d`` is two renames, not one atomic step) gets its copy renamed."""
    tables = _tables(engine)
    if any(_NEW.format(table) in tables for table in SMALL_GRANULE_TABLES):
        # only when there is something to swap: a loader already writing must not lose the
        # view for a moment because another one starts and runs this step again
        engine.execute("DROP TABLE IF EXISTS sends_by_person_mv")
    for table in SMALL_GRANULE_TABLES:
        new, old = _NEW.format(table), _OLD.format(table)
        if table not in tables and new in tables:  # crashed between the two renames
            engine.execute(f"RENAME TABLE {new} TO {table}")
        elif table in tables and new in tables:
            if _granularity(tables[new]) != SMALL_GRANULES:
                raise RuntimeError(f"{new} is not the copy of {table} this migration makes")
            if _granularity(tables[table]) != SMALL_GRANULES:
                if old in tables:  # not a state this migration leaves: look before dropping
                    raise RuntimeError(f"{old} exists beside {table}: which one is current?")
                engine.execute(f"RENAME TABLE {table} TO {old}, {new} TO {table}")
    engine.execute(_SENDS_BY_PERSON_MV)


def _drop_replaced(engine: Engine) -> None:
    """Step 3 of 3: drop the tables the copies replaced (and any copy a crash left behind
    beside a table swapped already: the copy step makes none for such a table)."""
    tables = _tables(engine)
    for table in SMALL_GRANULE_TABLES:
        old, new = _OLD.format(table), _NEW.format(table)
        if table in tables and _granularity(tables[table]) == SMALL_GRANULES:
            engine.execute(f"DROP TABLE IF EXISTS {old}")
            engine.execute(f"DROP TABLE IF EXISTS {new}")


# The Opened folder's order: every value an email's last open (any, or human) took, sorted by
# time, so that a page reads the newest entries of a small sorted table instead of scanning
# every state. Entries are never removed when an email is opened again (the old time stays
# behind): a read keeps an entry only while it equals the email's current state
# (``warehouse.reads.opened_folder``). Filled by a view on every insert into email_state,
# whichever writer makes it (loader, reload, migrations).
_FOLDER_INDEX = f"""CREATE TABLE IF NOT EXISTS folder_index (
        human UInt8, t Int64, email_id String
    ) ENGINE = ReplacingMergeTree ORDER BY (human, t, email_id)
    SETTINGS index_granularity = {SMALL_GRANULES}"""
_FOLDER_ENTRIES = """SELECT human, t, email_id FROM {source}
    ARRAY JOIN [0, 1] AS human, [last_opened_at, last_human_opened_at] AS t
    WHERE t > 0"""
_FOLDER_INDEX_MV = ("CREATE MATERIALIZED VIEW IF NOT EXISTS folder_index_mv TO folder_index AS "
                    + _FOLDER_ENTRIES.format(source="email_state"))
# The states written before the view: made after it, so that none written in between is
# missed (a rerun writes entries again, which the table collapses).
_FILL_FOLDER_INDEX = "INSERT INTO folder_index " + _FOLDER_ENTRIES.format(
    source="(SELECT email_id, last_opened_at, last_human_opened_at FROM email_state FINAL)")

# A profile's emails, for the Opened folder of one profile: the folder index's candidates
# are filtered by this set (one range read) instead of looking up the send of each.
_SENDS_BY_PROFILE = """CREATE TABLE IF NOT EXISTS sends_by_profile (
        profile_id String, email_id String, registered_at Int64
    ) ENGINE = ReplacingMergeTree(registered_at) ORDER BY (profile_id, email_id)"""
_SENDS_BY_PROFILE_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS sends_by_profile_mv
        TO sends_by_profile AS SELECT profile_id, email_id, registered_at FROM sends"""
_FILL_SENDS_BY_PROFILE = """INSERT INTO sends_by_profile
        SELECT profile_id, email_id, registered_at FROM sends FINAL"""


# One email's rows for a read by id, all in one table: its sends, states and engagement,
# each packed in two arrays, sorted by email. A read of a few emails then reads one table
# instead of three (1M-email warehouse, one email: about 3 ms against 9 ms; each table a
# chDB statement reads costs 2-3 ms, each column a file and a buffer). Views fill it on every
# insert into the three tables, whichever writer makes it. ``source`` is ``send``, ``state``
# or the engagement's kind; ``item`` the engagement's event id. A ReplacingMergeTree on the
# version of the sources (registered_at, the state's revision) keeps what FINAL would keep;
# a read picks the newest of the rows not merged yet (``warehouse.reads``).
LOOKUP_SEND_TEXTS = ("profile_id", "person_type", "person_id", "template_id", "subject",
                     "sequence_id")
LOOKUP_SEND_NUMBERS = ("sequence_step", "sent_at", "tracking")
LOOKUP_STATE_NUMBERS = ("opened", "open_count", "human_open_count", "machine_open_count",
                        "raw_load_count", "first_opened_at", "last_opened_at",
                        "last_human_opened_at")
_LOOKUP_COLUMNS = "email_id, source, item, version, tiebreak, texts, numbers"
_LOOKUP_SELECTS = {  # view -> its rows, in the table's column order
    "email_lookup_sends_mv": f"""SELECT email_id, 'send' AS source, '' AS item,
        toUInt64(registered_at) AS version, toInt64(0) AS tiebreak,
        [{", ".join(LOOKUP_SEND_TEXTS)}] AS texts,
        [{", ".join(f"toInt64({c})" for c in LOOKUP_SEND_NUMBERS)}] AS numbers FROM sends""",
    "email_lookup_states_mv": f"""SELECT email_id, 'state' AS source, '' AS item,
        revision AS version, first_human_opened_at AS tiebreak, emptyArrayString() AS texts,
        [{", ".join(f"toInt64({c})" for c in LOOKUP_STATE_NUMBERS)}] AS numbers
        FROM email_state""",
    "email_lookup_engagement_mv": """SELECT email_id, kind AS source, event_id AS item,
        toUInt64(0) AS version, toInt64(0) AS tiebreak, emptyArrayString() AS texts,
        emptyArrayInt64() AS numbers FROM engagement""",
}


def _create_email_lookup(engine: Engine) -> None:
    """The table, with small granules (and small blocks where the engine takes them)."""
    clause = _with_granularity("ReplacingMergeTree(version) ORDER BY (email_id, source, item)",
                               SMALL_GRANULES, small_block_settings(engine))
    engine.execute(f"""CREATE TABLE IF NOT EXISTS email_lookup (
        email_id String, source String, item String, version UInt64, tiebreak Int64,
        texts Array(String), numbers Array(Int64)
    ) ENGINE = {clause}""")


def _fill_email_lookup(engine: Engine) -> None:
    """The views first, then the rows written before them: a row written in between is
    there twice, which the table collapses and reads pick one of (so does a rerun)."""
    for view, select in _LOOKUP_SELECTS.items():
        engine.execute(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO email_lookup "
                       f"AS {select}")
    for select in _LOOKUP_SELECTS.values():
        engine.execute(f"INSERT INTO email_lookup ({_LOOKUP_COLUMNS}) {select}")


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
        _SENDS_BY_PERSON_MV,
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
    (4, f"index_granularity {SMALL_GRANULES} (and small blocks) for the tables read by key", [
        _copy_with_small_granules,
        _swap_in_small_granules,
        _drop_replaced,
    ]),
    (5, "folder_index: the Opened folder's emails sorted by their last open", [
        _FOLDER_INDEX,
        _FOLDER_INDEX_MV,
        _FILL_FOLDER_INDEX,
    ]),
    (6, "sends_by_profile: a profile's emails, for its Opened folder", [
        _SENDS_BY_PROFILE,
        _SENDS_BY_PROFILE_MV,
        _FILL_SENDS_BY_PROFILE,
    ]),
    (7, "email_lookup: an email's send, state and engagement rows in one table, read by id", [
        _create_email_lookup,
        _fill_email_lookup,
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

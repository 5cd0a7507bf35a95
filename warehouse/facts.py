"""Per-email facts: one short row per send with everything a comparison counts.

Why: comparing templates, subjects or sequence steps from the raw tables groups every open
of every email (10M opens: 1-3 s on two cores); ``email_facts`` holds one row per email - the
send's group keys, its open counters and first human open, whether it got a reply or an
unsubscribe - so a comparison is one scan of short rows (about 70 ms for 1M emails).

How it stays right whatever order sends, states and engagement arrive in: a facts row is a
pure function of the raw tables (the newest send, the newest state, whether a reply and an
unsubscribe exist). After writing a batch, the loader recomputes, from the raw tables, the
rows of the emails the batch touched (``refresh``). An email without a send has no row; its
send, when it comes, picks up the state and engagement already there. The row's ``version``
is the sum of its sources' versions (``registered_at`` + state revision + replied +
unsubscribed); each only grows, so of two computations of one email the more complete has the
higher version, and the ReplacingMergeTree keeps it. That holds when two writers race (a
reload beside the live loader, a rebalance): each recomputes after its own rows are written,
so at least one of them sees both writes. Retries, redeliveries and replays compute the same
row again, with the same version.

Portable: plain columns and one JOIN per SELECT, like every table here (ClickHouse 18.16 has
no SimpleAggregateFunction, and AggregatingMergeTree states made the read 20x slower).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from warehouse.engines import Engine

SEND_FIELDS = (
    "profile_id", "person_type", "person_id", "template_id", "subject", "sequence_id",
    "sequence_step", "sent_at", "tracking", "registered_at",
)
STATE_FIELDS = ("open_count", "human_open_count", "first_human_opened_at", "last_human_opened_at")
FACT_COLUMNS = (
    "email_id", *SEND_FIELDS, *STATE_FIELDS, "state_revision", "replied", "unsubscribed",
    "version",
)

CREATE_TABLE = """CREATE TABLE IF NOT EXISTS email_facts (
    email_id String, profile_id String, person_type String, person_id String,
    template_id String, subject String, sequence_id String, sequence_step UInt16,
    sent_at Int64, tracking UInt8, registered_at Int64,
    open_count UInt32, human_open_count UInt32, first_human_opened_at Int64,
    last_human_opened_at Int64, state_revision UInt64,
    replied UInt8, unsubscribed UInt8, version UInt64
) ENGINE = ReplacingMergeTree(version) ORDER BY email_id"""

# The id list stands three times in a refresh statement, and ClickHouse refuses statements
# longer than max_query_size (256 KiB by default, on 18.16 too).
_IDS_BYTES_PER_STATEMENT = 64 * 1024


def select(email_condition: str) -> str:
    """The facts rows of the emails matching ``email_condition``, computed from the raw
    tables. The condition is on ``email_id`` alone: it leads every source's sorting key, so
    it may sit beside FINAL (every version of a row matches it or none does) and prunes the
    granules read."""
    send = ", ".join(SEND_FIELDS)
    state = ", ".join(STATE_FIELDS)
    return f"""
        SELECT {', '.join(FACT_COLUMNS[:-1])},
               toUInt64(registered_at) + state_revision + replied + unsubscribed AS version
        FROM (
            SELECT email_id, {send}, {state}, state_revision
            FROM (SELECT email_id, {send} FROM sends FINAL WHERE {email_condition}) AS s
            ANY LEFT JOIN (
                SELECT email_id, {state}, revision AS state_revision
                FROM email_state FINAL WHERE {email_condition}
            ) AS st USING email_id
        ) AS sst
        ANY LEFT JOIN (
            SELECT email_id, max(kind = 'reply') AS replied,
                   max(kind = 'unsubscribe') AS unsubscribed
            FROM engagement WHERE {email_condition} GROUP BY email_id
        ) AS g USING email_id"""


def _chunks(email_ids: list[str]) -> Iterator[tuple[str, ...]]:
    """Sorted ids in runs that keep a statement under ClickHouse's size limit; sorted, so
    each run's lookups touch only its own stretch of the tables' granules."""
    chunk: list[str] = []
    size = 0
    for email_id in email_ids:
        cost = len(email_id.encode()) + 6  # quotes, escaping slack, comma and space
        if chunk and size + cost > _IDS_BYTES_PER_STATEMENT:
            yield tuple(chunk)
            chunk, size = [], 0
        chunk.append(email_id)
        size += cost
    if chunk:
        yield tuple(chunk)


def refresh(engine: Engine, email_ids: Iterable[str]) -> int:
    """Recompute the facts of these emails from the raw tables (written first) and insert
    them in one part; returns how many rows (emails without a send have none)."""
    rows: list[tuple] = []
    for chunk in _chunks(sorted(set(email_ids))):
        found = engine.query(select("email_id IN %(ids)s"), {"ids": chunk})
        rows += [tuple(row[c] for c in FACT_COLUMNS) for row in found]
    engine.insert("email_facts", FACT_COLUMNS, rows)
    return len(rows)


def refresh_matching(engine: Engine, email_ids_query: str) -> None:
    """Recompute, inside ClickHouse, the facts of the emails a query names (``SELECT
    email_id FROM ...``): for writers that put rows in the raw tables without the loader's
    ``write_batch``, such as a staged bulk insert."""
    engine.execute(f"INSERT INTO email_facts ({', '.join(FACT_COLUMNS)}) "
                   f"{select(f'email_id IN ({email_ids_query})')}")


def rebuild(engine: Engine) -> None:
    """Recompute every email's facts (the backfill of an existing warehouse)."""
    engine.execute(f"INSERT INTO email_facts ({', '.join(FACT_COLUMNS)}) {select('1')}")

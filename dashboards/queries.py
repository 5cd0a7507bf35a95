"""The counting, in ClickHouse SQL that runs on chDB and on the 18.16 server alike.

Portable on purpose: no window functions, no DateTime64, no JSON functions, one JOIN per
SELECT (18.16 cannot chain them), ``LIMIT offset, n``. Every table is a ReplacingMergeTree
read with ``FINAL``; filters on columns outside the sorting key sit in an outer SELECT, so
they see the newest version of a row, never an older one. Values travel as ``%(name)s``
parameters only; the few identifiers that vary (grouping columns, sort orders) come from
the fixed tables below, never from a request.

Counted opens are the deduplicated loads (``counted = 1``); a "human" open is one not
classified ``machine`` (a proxy open is a person reading), as in the per-email state.

Comparisons, send timing and follow-ups read ``email_facts`` (``warehouse.facts``): one row
per send with its group keys, its open counters from the worker's state, its first human
open, and whether it got a reply or an unsubscribe - so they scan one short row per email,
never the opens. Only the open timing reads the opens, for the time of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dashboards.params import Filters

# grouping -> (send columns that make its key, extra condition on the sends)
GROUP_COLUMNS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "template": (("template_id",), None),
    "subject": (("subject",), None),
    "sequence": (("sequence_id",), "sequence_id != ''"),
    "sequence_step": (("sequence_id", "sequence_step"), "sequence_id != ''"),
}

FOLLOW_UP_ORDER = {
    "recent": "last_human_opened_at DESC, human_open_count DESC, email_id",
    "reopened": "human_open_count DESC, last_human_opened_at DESC, email_id",
}

FOLLOW_UP_COLUMNS = (
    "email_id", "profile_id", "person_type", "person_id", "template_id", "subject",
    "sequence_id", "sequence_step", "sent_at",
)

# Servers newer than 18.16 take this: opens and engagement are partitioned by the month of
# their own event time, so every version of a row lives in one partition and FINAL need not
# merge across partitions (on 10M opens it cuts the FINAL read about fivefold). email_facts
# has one partition, so it changes nothing there.
MODERN_SETTINGS = "SETTINGS do_not_merge_across_partitions_select_final = 1"


@dataclass(frozen=True)
class Scope:
    """The sends an analysis covers: a WHERE clause on the send's columns (of ``sends`` or
    ``email_facts``) and its parameters.
    ``narrow``: the user filtered, so reading the other tables only for these emails pays."""

    where: str
    params: dict[str, Any]
    narrow: bool

    def restricted(self, condition: str) -> Scope:
        return Scope(f"{self.where} AND {condition}", self.params, self.narrow)


def send_scope(filters: Filters) -> Scope:
    conditions: list[str] = []
    params: dict[str, Any] = {}
    for column, op, name, value in (
        ("sent_at", ">=", "start", filters.start),
        ("sent_at", "<", "end", filters.end),
        ("profile_id", "=", "profile_id", filters.profile_id),
        ("person_type", "=", "person_type", filters.person_type),
    ):
        if value is not None:
            conditions.append(f"{column} {op} %({name})s")
            params[name] = value
    for column, name, ids in (
        ("template_id", "template_ids", filters.template_ids),
        ("sequence_id", "sequence_ids", filters.sequence_ids),
    ):
        if ids:
            conditions.append(f"has(%({name})s, {column})")
            params[name] = list(ids)
    return Scope(" AND ".join(conditions) or "1", params, bool(conditions))


def _sends(columns: tuple[str, ...], scope: Scope) -> str:
    return f"SELECT {', '.join(columns)} FROM (SELECT * FROM sends FINAL) WHERE {scope.where}"


# What a scope's conditions name; every column of them is in email_facts too.
SCOPE_COLUMNS = ("sent_at", "profile_id", "person_type", "template_id", "sequence_id")


def _facts(columns: tuple[str, ...], scope: Scope) -> str:
    """One row per send in scope: ``columns`` of ``email_facts``, newest version (the
    conditions stay outside FINAL, so they see that version and never an older one)."""
    read = ", ".join(dict.fromkeys((*columns, *SCOPE_COLUMNS)))
    return (f"SELECT {', '.join(columns)} FROM (SELECT {read} FROM email_facts FINAL) "
            f"WHERE {scope.where}")


def _scoped(table: str, scope: Scope) -> str:
    """Rows of ``table`` (FINAL) for the emails in scope. email_id leads every sorting key,
    so the IN reads only their granules; without filters every send is in scope, and the IN
    would cost more (a set of every email) than it saves."""
    if not scope.narrow:
        return f"SELECT * FROM {table} FINAL"
    return (f"SELECT * FROM {table} FINAL WHERE email_id IN "
            f"(SELECT email_id FROM ({_sends(('email_id',), scope)}))")


# The facts each group total needs, and the totals.
TOTALS_COLUMNS = ("sent_at", "tracking", "open_count", "human_open_count",
                  "first_human_opened_at", "replied", "unsubscribed")
GROUP_TOTALS = """
    count() AS sent, sum(tracking) AS tracked,
    countIf(open_count > 0) AS opened, countIf(human_open_count > 0) AS human_opened,
    sum(open_count) AS total_opens, sum(human_open_count) AS human_opens,
    countIf(replied = 1) AS replies, countIf(unsubscribed = 1) AS unsubscribes,
    quantilesExactIf(0.5, 0.9)(greatest(first_human_opened_at - sent_at, 0),
                               first_human_opened_at > 0) AS first_human_open_ms"""


def compare(by: str, filters: Filters) -> tuple[str, dict[str, Any]]:
    """Counts per group of ``by``: the numbers every rate and test is made from."""
    keys, extra = GROUP_COLUMNS[by]
    scope = send_scope(filters)
    if extra:
        scope = scope.restricted(extra)
    key_list = ", ".join(keys)
    sql = f"""
        SELECT {key_list}, {GROUP_TOTALS}
        FROM ({_facts((*keys, *TOTALS_COLUMNS), scope)})
        GROUP BY {key_list}"""
    return sql, scope.params


def send_timing(filters: Filters, tz: str) -> tuple[str, dict[str, Any]]:
    """The same totals per weekday (1 = Monday) and hour of sending, in ``tz``."""
    scope = send_scope(filters)
    sql = f"""
        SELECT toDayOfWeek(t) AS weekday, toHour(t) AS hour, {GROUP_TOTALS}
        FROM (
            SELECT *, toDateTime(intDiv(sent_at, 1000), %(tz)s) AS t
            FROM ({_facts(TOTALS_COLUMNS, scope)})
        )
        GROUP BY weekday, hour"""
    return sql, {**scope.params, "tz": tz}


def open_timing(filters: Filters, tz: str) -> tuple[str, dict[str, Any]]:
    """Counted opens of the sends in scope per weekday and hour of opening, in ``tz``."""
    scope = send_scope(filters)
    sql = f"""
        SELECT toDayOfWeek(t) AS weekday, toHour(t) AS hour,
               countIf(load_class != 'machine') AS human_opens,
               countIf(load_class = 'machine') AS machine_opens
        FROM (
            SELECT toDateTime(intDiv(received_at, 1000), %(tz)s) AS t, load_class, counted
            FROM ({_scoped('opens', scope)})
        )
        WHERE counted = 1
        GROUP BY weekday, hour"""
    return sql, {**scope.params, "tz": tz}


def _follow_up_from(filters: Filters) -> tuple[str, dict[str, Any]]:
    """Sends in scope that a person opened and nobody replied to or unsubscribed from."""
    scope = send_scope(filters)
    columns = (*FOLLOW_UP_COLUMNS, "open_count", "human_open_count", "last_human_opened_at",
               "replied", "unsubscribed")
    sql = f"""
        FROM ({_facts(columns, scope)})
        WHERE human_open_count > 0 AND replied = 0 AND unsubscribed = 0"""
    return sql, scope.params


def follow_ups(
    filters: Filters, sort: str, limit: int, offset: int
) -> tuple[str, dict[str, Any]]:
    source, params = _follow_up_from(filters)
    sql = f"""
        SELECT {', '.join(FOLLOW_UP_COLUMNS)}, open_count, human_open_count,
               last_human_opened_at
        {source}
        ORDER BY {FOLLOW_UP_ORDER[sort]}
        LIMIT %(offset)s, %(limit)s"""
    return sql, {**params, "offset": offset, "limit": limit}


def follow_up_counts(filters: Filters) -> tuple[str, dict[str, Any]]:
    """How long each profile's queue is."""
    source, params = _follow_up_from(filters)
    return f"SELECT profile_id, count() AS follow_ups {source} GROUP BY profile_id", params


def profile_ids() -> tuple[str, dict[str, Any]]:
    """The profiles that sent something, for the pages' profile filter."""
    return "SELECT DISTINCT profile_id FROM sends ORDER BY profile_id LIMIT 1000", {}

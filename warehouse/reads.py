"""The reads behind the CRM API, as plain functions over an engine.

Lists are paged by keyset (an opaque cursor holding the last row's sort key), never by
OFFSET, so a page costs the same at any depth. The Opened folder is a snapshot: its first
page fixes ``as_of`` (a moment just before the request, so loads still in flight have
landed) and every later page ranks emails by their last open *as of then*; an email opened
again while someone pages keeps its place, so no email is skipped or shown twice.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentrack.events import now_ms
from opentrack.times import iso
from warehouse.engines import Engine

TIME_FIELDS = ("first_opened_at", "last_opened_at", "last_human_opened_at", "sent_at")
FOLDER_SETTLE_MS = 2000  # the folder's snapshot lags the clock by this much

# Emails with their send's metadata, open state and engagement counts (one JOIN per
# SELECT: ClickHouse 18.16 supports no more).
_EMAIL_COLUMNS = (
    "email_id", "profile_id", "person_type", "person_id", "template_id", "subject",
    "sequence_id", "sequence_step", "sent_at", "tracking", "opened", "open_count",
    "human_open_count", "machine_open_count", "raw_load_count", "first_opened_at",
    "last_opened_at", "last_human_opened_at", "replies", "unsubscribes",
)
_EMAILS_SQL = f"""
SELECT {", ".join(_EMAIL_COLUMNS)} FROM (
SELECT s.email_id AS email_id, s.profile_id AS profile_id,
       s.person_type AS person_type, s.person_id AS person_id,
       s.template_id AS template_id, s.subject AS subject,
       s.sequence_id AS sequence_id, s.sequence_step AS sequence_step,
       s.sent_at AS sent_at, s.tracking AS tracking,
       st.opened AS opened, st.open_count AS open_count,
       st.human_open_count AS human_open_count,
       st.machine_open_count AS machine_open_count,
       st.raw_load_count AS raw_load_count, st.first_opened_at AS first_opened_at,
       st.last_opened_at AS last_opened_at,
       st.last_human_opened_at AS last_human_opened_at
FROM (SELECT * FROM sends FINAL WHERE email_id IN %(ids)s) AS s
LEFT JOIN (SELECT * FROM email_state FINAL WHERE email_id IN %(ids)s) AS st USING email_id
) AS se
LEFT JOIN (
    SELECT email_id, countIf(kind = 'reply') AS replies,
           countIf(kind = 'unsubscribe') AS unsubscribes
    FROM engagement FINAL WHERE email_id IN %(ids)s GROUP BY email_id
) AS e USING email_id
"""


class BadCursor(ValueError):
    pass


def _present(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name in TIME_FIELDS:
        out[name] = iso(out[name])
    out["opened"] = bool(out["opened"])
    out["tracking"] = bool(out["tracking"])
    out["sequence_id"] = out["sequence_id"] or None
    out["sequence_step"] = out["sequence_step"] or None
    out["replied"] = out["replies"] > 0
    out["unsubscribed"] = out["unsubscribes"] > 0
    return out


def emails(engine: Engine, email_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Registered emails among ``email_ids`` with their state, keyed by id."""
    ids = tuple(email_ids)
    if not ids:
        return {}
    return {r["email_id"]: _present(r) for r in engine.query(_EMAILS_SQL, {"ids": ids})}


def email_opens(engine: Engine, email_id: str) -> dict[str, Any] | None:
    """One email's open state with its send's metadata; None for an email never registered."""
    return emails(engine, [email_id]).get(email_id)


# -- cursors ------------------------------------------------------------------------------
def encode_cursor(values: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode()


def decode_cursor(cursor: str, fields: dict[str, type]) -> dict[str, Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, UnicodeError):
        raise BadCursor("cursor is not one this API returned") from None
    if not isinstance(values, dict) or set(values) != set(fields) or not all(
        isinstance(values[k], t) and not isinstance(values[k], bool) for k, t in fields.items()
    ):
        raise BadCursor("cursor is not one this API returned")
    return values


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "next_cursor": self.next_cursor}


def _page(
    engine: Engine, rows: list[dict[str, Any]], limit: int,
    cursor_of: Callable[[dict[str, Any]], dict[str, Any]],
) -> Page:
    """The emails of ``rows`` in order with their state; a cursor after a full page."""
    details = emails(engine, [r["email_id"] for r in rows])
    items = [details[r["email_id"]] for r in rows if r["email_id"] in details]
    next_cursor = encode_cursor(cursor_of(rows[-1])) if len(rows) == limit else None
    return Page(items, next_cursor)


# -- the Opened folder --------------------------------------------------------------------
_FOLDER_CURSOR = {"t": int, "id": str, "as_of": int}


def opened_folder(
    engine: Engine,
    *,
    profile_id: str | None = None,
    since: int | None = None,
    until: int | None = None,
    human_only: bool = True,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """Opened emails, the most recently opened first (by human opens unless ``human_only``
    is off: an email only a machine loaded is not "opened" for a recruiter)."""
    after = decode_cursor(cursor, _FOLDER_CURSOR) if cursor else None
    as_of = after["as_of"] if after else now_ms() - FOLDER_SETTLE_MS
    column = "last_human_opened_at" if human_only else "last_opened_at"
    class_filter = "AND load_class != 'machine'" if human_only else ""
    conditions = ["t > 0"]
    params: dict[str, Any] = {"as_of": as_of, "limit": limit}
    if after:
        conditions.append("(t, email_id) < (%(after_t)s, %(after_id)s)")
        params.update(after_t=after["t"], after_id=after["id"])
    if since is not None:
        conditions.append("t >= %(since)s")
        params["since"] = since
    if until is not None:
        conditions.append("t < %(until)s")
        params["until"] = until
    if profile_id is not None:
        conditions.append("email_id IN (SELECT email_id FROM sends FINAL "
                          "WHERE profile_id = %(profile_id)s)")
        params["profile_id"] = profile_id
    # Unchanged since the snapshot: the state says when. Opened again since: the last
    # counted open up to the snapshot, from the opens themselves (few emails, by key).
    rows = engine.query(
        f"""
        SELECT email_id, t FROM (
            SELECT email_id, {column} AS t FROM email_state FINAL
            WHERE {column} <= %(as_of)s
            UNION ALL
            SELECT email_id, max(received_at) AS t FROM opens FINAL
            WHERE email_id IN (SELECT email_id FROM email_state FINAL
                               WHERE {column} > %(as_of)s)
              AND counted = 1 {class_filter} AND received_at <= %(as_of)s
            GROUP BY email_id
        )
        WHERE {" AND ".join(conditions)}
        ORDER BY t DESC, email_id DESC
        LIMIT %(limit)s
        """,
        params,
    )
    return _page(engine, rows, limit, lambda last: {
        "t": last["t"], "id": last["email_id"], "as_of": as_of})


# -- a person's emails --------------------------------------------------------------------
_PERSON_CURSOR = {"sent_at": int, "id": str}


def person_emails(
    engine: Engine, person_type: str, person_id: str, *, limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """A candidate's or contact's emails, newest send first, each with its open state."""
    after = decode_cursor(cursor, _PERSON_CURSOR) if cursor else None
    params: dict[str, Any] = {"type": person_type, "id": person_id, "limit": limit}
    keyset = ""
    if after:
        keyset = "AND (sent_at, email_id) < (%(after_t)s, %(after_id)s)"
        params.update(after_t=after["sent_at"], after_id=after["id"])
    rows = engine.query(
        f"""
        SELECT email_id, sent_at FROM sends_by_person FINAL
        WHERE person_type = %(type)s AND person_id = %(id)s {keyset}
        ORDER BY sent_at DESC, email_id DESC
        LIMIT %(limit)s
        """,
        params,
    )
    return _page(engine, rows, limit, lambda last: {
        "sent_at": last["sent_at"], "id": last["email_id"]})

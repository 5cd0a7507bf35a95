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

# An email's send, its open state and its engagement, read by three lookups on the tables'
# sorting key. One statement joining them cost about 1.5x the CPU of the three (chDB plans
# each JOIN for milliseconds, more than a lookup of one granule costs).
_SEND_COLUMNS = (
    "email_id", "profile_id", "person_type", "person_id", "template_id", "subject",
    "sequence_id", "sequence_step", "sent_at", "tracking",
)
_STATE_COLUMNS = (
    "opened", "open_count", "human_open_count", "machine_open_count", "raw_load_count",
    "first_opened_at", "last_opened_at", "last_human_opened_at",
)
_SENDS_SQL = f"SELECT {', '.join(_SEND_COLUMNS)} FROM sends FINAL WHERE email_id IN %(ids)s"
_STATES_SQL = (f"SELECT email_id, {', '.join(_STATE_COLUMNS)} FROM email_state FINAL "
               "WHERE email_id IN %(ids)s")
# Distinct event ids count what FINAL would keep (the key is email_id, kind, event_id),
# without merging the monthly partitions' parts: about half the CPU.
_ENGAGEMENT_SQL = """
SELECT email_id, uniqExactIf(event_id, kind = 'reply') AS replies,
       uniqExactIf(event_id, kind = 'unsubscribe') AS unsubscribes
FROM engagement WHERE email_id IN %(ids)s GROUP BY email_id
"""
_NEVER_OPENED = dict.fromkeys(_STATE_COLUMNS, 0)
_NO_ENGAGEMENT = {"replies": 0, "unsubscribes": 0}


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
    sends = engine.query(_SENDS_SQL, {"ids": ids}) if ids else []
    if not sends:  # an unknown email costs one lookup
        return {}
    found = {"ids": tuple(send["email_id"] for send in sends)}
    states = {r.pop("email_id"): r for r in engine.query(_STATES_SQL, found)}
    engagement = {r.pop("email_id"): r for r in engine.query(_ENGAGEMENT_SQL, found)}
    return {
        send["email_id"]: _present({
            **send, **states.get(send["email_id"], _NEVER_OPENED),
            **engagement.get(send["email_id"], _NO_ENGAGEMENT),
        })
        for send in sends
    }


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
    is off: an email only a machine loaded is not "opened" for a recruiter).

    Two reads, each at most ``limit`` rows: the emails whose state has not changed since the
    snapshot, ranked by the state; and, if there are any, the emails opened again since,
    ranked by their last counted open up to the snapshot, from the opens themselves. The
    second read asks only for opens from the lowest time on the first's page on (older ones
    cannot rank on this page), which lets ClickHouse skip the parts of older months and,
    before merges, of older batches: its cost grows with how many emails were opened since
    the snapshot.
    """
    after = decode_cursor(cursor, _FOLDER_CURSOR) if cursor else None
    as_of = after["as_of"] if after else now_ms() - FOLDER_SETTLE_MS
    column = "last_human_opened_at" if human_only else "last_opened_at"
    class_filter = "AND load_class != 'machine'" if human_only else ""
    conditions = ["t > 0"]
    params: dict[str, Any] = {"as_of": as_of, "limit": limit, "floor": since or 0}
    if after:
        conditions.append("(t, email_id) < (%(after_t)s, %(after_id)s)")
        params.update(after_t=after["t"], after_id=after["id"])
    if since is not None:
        conditions.append("t >= %(since)s")
        params["since"] = since
    if until is not None:
        conditions.append("t < %(until)s")
        params["until"] = until
    # Opened since the snapshot: any row of theirs says so, merged or not (an email sent
    # here by a stale row is still ranked exactly, by its opens).
    opened_since = f"SELECT email_id FROM email_state WHERE {column} > %(as_of)s"

    def ranked(profile_scope: str) -> str:
        """The page's conditions and order; the profile's sends are looked up only among
        ``profile_scope`` (all of them: a scan; the few opened since: by key)."""
        where = list(conditions)
        if profile_id is not None:
            where.append("email_id IN (SELECT email_id FROM sends FINAL WHERE profile_id = "
                         f"%(profile_id)s {profile_scope})")
            params["profile_id"] = profile_id
        return f"WHERE {' AND '.join(where)} ORDER BY t DESC, email_id DESC LIMIT %(limit)s"

    unchanged = engine.query(
        f"""
        SELECT email_id, t, (SELECT count() FROM ({opened_since})) AS opened_since FROM (
            SELECT email_id, {column} AS t FROM email_state FINAL
            WHERE {column} <= %(as_of)s AND email_id NOT IN ({opened_since})
        ) {ranked("")}
        """,
        params,
    )
    reopened: list[dict[str, Any]] = []
    if not unchanged or unchanged[0]["opened_since"]:
        if len(unchanged) == limit:
            params["floor"] = max(params["floor"], unchanged[-1]["t"])
        reopened = engine.query(
            f"""
            SELECT email_id, t FROM (
                SELECT email_id, max(received_at) AS t FROM opens FINAL
                WHERE email_id IN ({opened_since}) AND counted = 1 {class_filter}
                  AND received_at <= %(as_of)s AND received_at >= %(floor)s
                GROUP BY email_id
            ) {ranked(f"AND email_id IN ({opened_since})")}
            """,
            params,
        )
    rows = sorted(unchanged + reopened, key=lambda r: (r["t"], r["email_id"]), reverse=True)
    return _page(engine, rows[:limit], limit, lambda last: {
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

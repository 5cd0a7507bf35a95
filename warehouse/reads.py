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
from dataclasses import dataclass, field
from typing import Any

from opentrack.events import now_ms
from opentrack.times import iso
from warehouse.engines import Engine
from warehouse.schema import LOOKUP_SEND_NUMBERS, LOOKUP_SEND_TEXTS
from warehouse.schema import LOOKUP_STATE_NUMBERS as _STATE_COLUMNS

TIME_FIELDS = ("first_opened_at", "last_opened_at", "last_human_opened_at", "sent_at")
FOLDER_SETTLE_MS = 2000  # the folder's snapshot lags the clock by this much


def newest(table: str, columns: str, condition: str) -> str:
    """The newest row per email of a ReplacingMergeTree, as FINAL reads it, for a lookup by
    key: about a third of FINAL's time on a 1M-email warehouse (sends: 7.4 vs 24 ms for 50
    ids; states 6.1 vs 10.2 ms). FINAL keeps the last inserted of equal versions; here equal
    versions carry equal rows, except states that migration 3 wrote again under their
    revision with the first human open filled in, which the second sort column ranks first.
    """
    version = {"sends": "registered_at", "email_state": "revision DESC, first_human_opened_at"}
    return (f"SELECT {columns} FROM {table} WHERE {condition} "
            f"ORDER BY {version[table]} DESC LIMIT 1 BY email_id")


# Emails' sends, states and engagement: their rows in ``email_lookup`` (schema migration 7),
# one table read by key; the newest version is picked here.
_BY_KEY = """SELECT email_id, source, item, version, tiebreak, texts, numbers
FROM email_lookup WHERE email_id IN %(ids)s"""
_NEVER_OPENED = dict.fromkeys(_STATE_COLUMNS, 0)
_PROFILE = LOOKUP_SEND_TEXTS.index("profile_id")


@dataclass
class Newest:
    """Emails' newest send and state and their engagement, as read by key."""

    # a send as read (its texts and numbers), made a dict only when asked: a folder round
    # reads thousands of candidates to keep a page of them
    sends: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # kind -> event ids

    def send(self, email_id: str) -> dict[str, Any] | None:
        if email_id not in self.sends:
            return None
        texts, numbers = self.sends[email_id]
        return {**dict(zip(LOOKUP_SEND_TEXTS, texts, strict=True)),
                **dict(zip(LOOKUP_SEND_NUMBERS, numbers, strict=True))}

    def profile_of(self, email_id: str) -> str | None:
        send = self.sends.get(email_id)
        return send[0][_PROFILE] if send else None

    def keep(self, other: Newest, email_id: str, state: dict[str, Any]) -> None:
        """One email of ``other``'s rows, with this state."""
        if email_id in other.sends:
            self.sends[email_id] = other.sends[email_id]
        self.states[email_id] = state
        self.events[email_id] = other.events.get(email_id, {})


def read_by_key(engine: Engine, ids: tuple[str, ...]) -> Newest:
    """The newest send and state, and the engagement, of these emails, in one statement.

    Of a ReplacingMergeTree's versions of a row, the newest is the one FINAL keeps (equal
    versions carry equal rows, except states that migration 3 wrote again under their
    revision with the first human open filled in, which rank first here); engagement counts
    distinct event ids, as FINAL would keep them."""
    found = Newest()
    if not ids:
        return found
    versions: dict[tuple[str, str], tuple[int, int]] = {}
    for row in engine.query(_BY_KEY, {"ids": ids}):
        email_id, source = row["email_id"], row["source"]
        if source not in ("send", "state"):  # an engagement kind
            found.events.setdefault(email_id, {}).setdefault(source, set()).add(row["item"])
            continue
        version = (row["version"], row["tiebreak"])
        if versions.get((source, email_id), (-1, -1)) >= version:
            continue
        versions[source, email_id] = version
        if source == "send":
            found.sends[email_id] = (row["texts"], row["numbers"])
        else:
            found.states[email_id] = dict(zip(_STATE_COLUMNS, row["numbers"], strict=True))
    return found


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


def emails(engine: Engine, email_ids: Iterable[str],
           known: Newest | None = None) -> dict[str, dict[str, Any]]:
    """Registered emails among ``email_ids`` with their state, keyed by id, in the order
    asked; those whose send is in ``known`` as the caller read them (a folder page: the
    state it was ranked by), the others read now."""
    ids = tuple(dict.fromkeys(email_ids))
    known = known or Newest()
    read = read_by_key(engine, tuple(i for i in ids if i not in known.sends))
    found: dict[str, dict[str, Any]] = {}
    for email_id in ids:
        rows = known if email_id in known.sends else read
        send = rows.send(email_id)
        if send is None:
            continue
        state = known.states.get(email_id) or rows.states.get(email_id, _NEVER_OPENED)
        engaged = rows.events.get(email_id, {})
        found[email_id] = _present({
            "email_id": email_id, **send,
            **{c: state[c] for c in _STATE_COLUMNS},
            "replies": len(engaged.get("reply", ())),
            "unsubscribes": len(engaged.get("unsubscribe", ())),
        })
    return found


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
    known: Newest | None = None,
) -> Page:
    """The emails of ``rows`` in order with their state; a cursor after a full page."""
    details = emails(engine, [r["email_id"] for r in rows], known)
    items = [details[r["email_id"]] for r in rows if r["email_id"] in details]
    next_cursor = encode_cursor(cursor_of(rows[-1])) if len(rows) == limit else None
    return Page(items, next_cursor)


# -- the Opened folder --------------------------------------------------------------------
_FOLDER_CURSOR = {"t": int, "id": str, "as_of": int}


# Candidates for a folder page: the newest entries of the sorted folder index (schema
# migration 5) below the page's bound. Old entries of emails opened again since stay in the
# index; ``_ranked_by_state`` drops every entry that no longer equals its email's state.
# The profile's set is not matched against the index's key (email_id comes third in it):
# ClickHouse's default prepares it for that all the same, 10 of the 27 ms of a round for the
# biggest profile.
_CANDIDATES_SQL = """
SELECT email_id, t FROM folder_index
WHERE human = %(human)s AND t > 0 AND t <= %(bound_t)s {conditions}
ORDER BY t DESC, email_id DESC LIMIT %(k)s
SETTINGS use_index_for_in_with_subqueries = 0
"""
# A profile's candidates only (schema migration 6): the biggest of 300 profiles, 9% of the
# sends, had its first page from 1,600 candidates of all profiles, whose sends were looked
# up one granule each (60 ms of its 106).
_OF_PROFILE = ("email_id IN (SELECT email_id FROM sends_by_profile "
               "WHERE profile_id = %(profile_id)s)")
_FIRST_ROUND, _LARGEST_ROUND = 64, 8192
# Candidates read before a page switches to a scan of the states: a long stretch of entries
# left behind by reopens would otherwise cost many rounds; the scan costs the same always.
_MOST_CANDIDATES = 20_000


def _ranked_by_state(
    engine: Engine, column: str, params: dict[str, Any], conditions: list[str],
    profile_id: str | None, limit: int, known: Newest,
) -> list[dict[str, Any]]:
    """The first ``limit`` emails, newest first, whose state has not changed since the
    snapshot (its last open is at most ``as_of``), ranked by that state; their rows as read
    (send, that state, engagement) go into ``known``, for the page.

    Reads the index in rounds, each a few times larger than the last, until the page is full
    or the index ends: a round costs a read of the index's newest granules below the
    bound and a lookup of its candidates' states (and sends, for a profile) by key. After
    ``_MOST_CANDIDATES`` the rest of the page comes from a scan of the states."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    bound: tuple[int, str] | None = None
    k = max(_FIRST_ROUND, 2 * limit)
    read = 0
    while len(found) < limit:
        if read >= _MOST_CANDIDATES and bound:
            return found + _scanned_by_state(engine, column, params, conditions, profile_id,
                                             limit - len(found), bound)
        where = list(conditions)
        if profile_id is not None:
            where.append(_OF_PROFILE)
        round_params = {**params, "k": k, "profile_id": profile_id,
                        "bound_t": min(params["as_of"], params.get("after_t", params["as_of"]))}
        if bound:
            where.append("(t, email_id) < (%(round_t)s, %(round_id)s)")
            round_params.update(bound_t=bound[0], round_t=bound[0], round_id=bound[1])
        rows = engine.query(_CANDIDATES_SQL.format(
            conditions="".join(f" AND {c}" for c in where)), round_params)
        if not rows:
            break
        read += len(rows)
        ids = tuple({r["email_id"] for r in rows} - seen)
        # with the profile's sends: one registered again under another profile leaves its
        # old entry in sends_by_profile
        newest_rows = read_by_key(engine, ids)
        current = newest_rows.states
        if profile_id is not None:
            current = {i: state for i, state in current.items()
                       if newest_rows.profile_of(i) == profile_id}
        for row in rows:
            state = current.get(row["email_id"])
            if row["email_id"] not in seen and state and state[column] == row["t"]:
                seen.add(row["email_id"])
                known.keep(newest_rows, row["email_id"], state)
                found.append(row)
                if len(found) == limit:
                    break
        if len(rows) < k:
            break
        bound = (rows[-1]["t"], rows[-1]["email_id"])
        k = min(4 * k, _LARGEST_ROUND)
    return found


def _scanned_by_state(
    engine: Engine, column: str, params: dict[str, Any], conditions: list[str],
    profile_id: str | None, limit: int, bound: tuple[int, str],
) -> list[dict[str, Any]]:
    """What ``_ranked_by_state`` gives below ``bound``, from a scan of all the states."""
    where = ["t > 0", "(t, email_id) < (%(round_t)s, %(round_id)s)", *conditions]
    if profile_id is not None:
        where.append("email_id IN (SELECT email_id FROM sends FINAL "
                     "WHERE profile_id = %(profile_id)s)")
    return engine.query(
        f"""
        SELECT email_id, t FROM (
            SELECT email_id, {column} AS t FROM email_state FINAL WHERE {column} <= %(as_of)s
        ) WHERE {' AND '.join(where)} ORDER BY t DESC, email_id DESC LIMIT %(rest)s
        """,
        {**params, "round_t": bound[0], "round_id": bound[1], "rest": limit,
         "profile_id": profile_id},
    )


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

    Two reads: the emails whose state has not changed since the snapshot, ranked by the
    state, from the folder index (``_ranked_by_state``); and, if there are any, the emails
    opened again since, ranked by their last counted open up to the snapshot, from the opens
    themselves. The second asks only for opens from the lowest time on the first's page on
    (older ones cannot rank on this page), which lets ClickHouse skip the parts of older
    months and, before merges, of older batches: its cost grows with how many emails were
    opened since the snapshot.
    """
    after = decode_cursor(cursor, _FOLDER_CURSOR) if cursor else None
    as_of = after["as_of"] if after else now_ms() - FOLDER_SETTLE_MS
    column = "last_human_opened_at" if human_only else "last_opened_at"
    class_filter = "AND load_class != 'machine'" if human_only else ""
    conditions: list[str] = []
    params: dict[str, Any] = {"as_of": as_of, "limit": limit, "floor": since or 0,
                              "human": int(human_only)}
    if after:
        conditions.append("(t, email_id) < (%(after_t)s, %(after_id)s)")
        params.update(after_t=after["t"], after_id=after["id"])
    if since is not None:
        conditions.append("t >= %(since)s")
        params["since"] = since
    if until is not None:
        conditions.append("t < %(until)s")
        params["until"] = until
    known = Newest()
    unchanged = _ranked_by_state(engine, column, params, conditions, profile_id, limit, known)
    # Opened since the snapshot: their state is newer than it, so the index has an entry
    # newer than it too (a read of its newest part), and the states confirm.
    opened_since = tuple(r["email_id"] for r in engine.query(
        "SELECT email_id FROM (" + newest(
            "email_state", f"email_id, {column}",
            "email_id IN (SELECT email_id FROM folder_index "
            "WHERE human = %(human)s AND t > %(as_of)s)",
        ) + f") WHERE {column} > %(as_of)s", params))
    reopened: list[dict[str, Any]] = []
    if opened_since:
        if len(unchanged) == limit:
            params["floor"] = max(params["floor"], unchanged[-1]["t"])
        where = ["t > 0", *conditions]
        if profile_id is not None:
            where.append("email_id IN (SELECT email_id FROM (" + newest(
                "sends", "email_id, profile_id", "email_id IN %(opened_since)s",
            ) + ") WHERE profile_id = %(profile_id)s)")
            params["profile_id"] = profile_id
        reopened = engine.query(
            f"""
            SELECT email_id, t FROM (
                SELECT email_id, max(received_at) AS t FROM opens FINAL
                WHERE email_id IN %(opened_since)s AND counted = 1 {class_filter}
                  AND received_at <= %(as_of)s AND received_at >= %(floor)s
                GROUP BY email_id
            ) WHERE {' AND '.join(where)} ORDER BY t DESC, email_id DESC LIMIT %(limit)s
            """,
            {**params, "opened_since": opened_since},
        )
    # an email opened again between the two reads is in both: listed once, at its first place
    rows: list[dict[str, Any]] = []
    listed: set[str] = set()
    for row in sorted(unchanged + reopened, key=lambda r: (r["t"], r["email_id"]), reverse=True):
        if row["email_id"] not in listed:
            listed.add(row["email_id"])
            rows.append(row)
    return _page(engine, rows[:limit], limit, lambda last: {
        "t": last["t"], "id": last["email_id"], "as_of": as_of}, known)


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

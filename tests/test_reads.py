"""The Opened folder and a person's emails, on both engines: order, filters, keyset paging."""

from __future__ import annotations

import uuid

import pytest

from opentrack.events import EmailState, Engagement, ProcessedOpen, SendRegistered, now_ms
from warehouse import reads
from warehouse.loader import rows_by_table, write_batch

T0 = 1_767_603_600_000  # 2026-01-05T09:00:00Z
MIN = 60_000


def write(engine, *events) -> None:
    write_batch(engine, rows_by_table((e.topic, e.to_bytes()) for e in events))


def opened(engine, email_id: str, profile: str, t: int, revision: int = 1, machine=False,
           person: str = "c1") -> None:
    """A send and one counted open at ``t`` (human unless ``machine``), as the worker emits."""
    write(
        engine,
        SendRegistered(email_id, profile, "candidate", person, "t1", "s", T0, registered_at=T0),
        ProcessedOpen(f"ev-{email_id}-{t}", email_id, t, "machine" if machine else "human", "",
                      True, "fp", revision=revision),
        EmailState(email_id, True, 1, 0 if machine else 1, 1 if machine else 0, 1, t, t,
                   None if machine else t, revision=revision),
    )


def reopen(engine, email_id: str, first: int, t: int) -> None:
    write(engine,
          ProcessedOpen(f"ev-{email_id}-{t}", email_id, t, "human", "", True, "fp2", revision=2),
          EmailState(email_id, True, 2, 2, 0, 2, first, t, t, revision=2))


@pytest.fixture
def profile() -> str:
    return f"prof-{uuid.uuid4().hex[:8]}"


def ids(page: reads.Page) -> list[str]:
    return [item["email_id"] for item in page.items]


def test_folder_newest_first_filters_and_human_only(warehouse_engine, profile) -> None:
    for i in range(5):
        opened(warehouse_engine, f"{profile}-e{i}", profile, T0 + i * MIN)
    opened(warehouse_engine, f"{profile}-bot", profile, T0 + 10 * MIN, machine=True)
    opened(warehouse_engine, f"{profile}-other", "another-profile", T0 + 11 * MIN)

    page = reads.opened_folder(warehouse_engine, profile_id=profile)
    assert ids(page) == [f"{profile}-e{i}" for i in (4, 3, 2, 1, 0)]
    assert page.next_cursor is None
    assert page.items[0]["last_opened_at"] == "2026-01-05T09:04:00.000Z"
    everything = reads.opened_folder(warehouse_engine, profile_id=profile, human_only=False)
    assert ids(everything)[0] == f"{profile}-bot"
    window = reads.opened_folder(warehouse_engine, profile_id=profile,
                                 since=T0 + MIN, until=T0 + 3 * MIN)
    assert ids(window) == [f"{profile}-e2", f"{profile}-e1"]


def test_folder_paging_while_opens_keep_arriving(warehouse_engine, profile) -> None:
    n = 23
    for i in range(n):
        opened(warehouse_engine, f"{profile}-p{i:02d}", profile, T0 + i * MIN)
    seen: list[str] = []
    page = reads.opened_folder(warehouse_engine, profile_id=profile, limit=5)
    while True:
        seen += ids(page)
        # between pages, now: old emails are opened again, new emails get opened
        k = len(seen)
        reopen(warehouse_engine, f"{profile}-p{k % n:02d}", T0 + (k % n) * MIN, now_ms() + k)
        opened(warehouse_engine, f"{profile}-new{k}", profile, now_ms() + k)
        if page.next_cursor is None:
            break
        page = reads.opened_folder(warehouse_engine, profile_id=profile, limit=5,
                                   cursor=page.next_cursor)
    assert sorted(seen) == sorted(f"{profile}-p{i:02d}" for i in range(n))  # once each
    assert len(seen) == len(set(seen))


def test_person_emails_newest_send_first_paged(warehouse_engine) -> None:
    person = f"person-{uuid.uuid4().hex[:8]}"
    for i in range(7):
        write(warehouse_engine, SendRegistered(f"{person}-m{i}", "p", "contact", person, "t", "s",
                                               T0 + i * MIN, registered_at=T0))
    opened(warehouse_engine, f"{person}-m3", "p", T0 + 100 * MIN, person=person)  # candidate
    got: list[str] = []
    page = reads.person_emails(warehouse_engine, "contact", person, limit=3)
    while True:
        got += ids(page)
        if page.next_cursor is None:
            break
        page = reads.person_emails(warehouse_engine, "contact", person, limit=3,
                                   cursor=page.next_cursor)
    assert got == [f"{person}-m{i}" for i in (6, 5, 4, 3, 2, 1, 0)]
    assert reads.person_emails(warehouse_engine, "candidate", person).items[0]["opened"] is True


@pytest.mark.parametrize("cursor", ["x", "eyJ0IjoxfQ==", "e30=", "bnVsbA=="])
def test_bad_cursors_are_refused(warehouse_engine, cursor) -> None:
    with pytest.raises(reads.BadCursor):
        reads.opened_folder(warehouse_engine, cursor=cursor)


@pytest.mark.parametrize("rounds", ["index", "index then scan"])
def test_folder_ranks_by_the_current_state_past_stale_index_entries(
    warehouse_engine, profile, monkeypatch, rounds
) -> None:
    """States rewritten many times (reopened, lowered by a re-decided load, machine-only)
    leave old entries in the folder index; pages walked in small rounds (and, in the second
    case, finished by a scan of the states) give exactly the order of the current states."""
    import random

    monkeypatch.setattr(reads, "_FIRST_ROUND", 4)
    monkeypatch.setattr(reads, "_LARGEST_ROUND", 16)
    if rounds == "index then scan":
        monkeypatch.setattr(reads, "_MOST_CANDIDATES", 24)
    rnd = random.Random(7)
    # a day of its own, a year or more before the other tests' opens
    base = T0 - (400 + int(profile.split("-")[1], 16) % 100_000) * 24 * 60 * MIN
    current: dict[str, tuple[str, int, int]] = {}
    for i in range(45):
        email_id = f"{profile}-s{i:02d}"
        owner = profile if i % 3 else f"{profile}-other"
        write(warehouse_engine, SendRegistered(email_id, owner, "candidate", "c", "t", "s",
                                               base, registered_at=base))
        for revision in range(1, rnd.randint(1, 5) + 1):
            last = base + rnd.randint(1, 300) * MIN
            human = rnd.choice([0, last, last - MIN])
            write(warehouse_engine, EmailState(email_id, True, revision, int(human > 0), 0,
                                               revision, base + MIN, last, human or None,
                                               revision=revision))
            current[email_id] = (owner, last, human)

    def walk(**filters) -> list[str]:
        got, cursor = [], None
        while True:
            page = reads.opened_folder(warehouse_engine, limit=4, cursor=cursor, **filters)
            got += ids(page)
            if page.next_cursor is None:
                return got
            cursor = page.next_cursor

    def expected(human_only: bool, owner: str | None) -> list[str]:
        ranked = [(state[2] if human_only else state[1], email_id)
                  for email_id, state in current.items() if owner in (None, state[0])]
        return [email_id for t, email_id in sorted(ranked, reverse=True) if t > 0]

    for human_only in (True, False):
        assert walk(profile_id=profile, human_only=human_only) == expected(human_only, profile)
        assert walk(since=base, until=base + 301 * MIN, human_only=human_only) == expected(
            human_only, None)


def test_email_lookup_reads_what_final_keeps(warehouse_engine, profile) -> None:
    """Versions written out of order, in separate parts: the lookup of one email and of
    several answers with the newest send and state and distinct engagement, as FINAL does."""
    a, b, never = f"{profile}-a", f"{profile}-b", f"{profile}-never"
    send = {"profile_id": profile, "person_type": "contact", "person_id": "p1",
            "template_id": "t1", "sent_at": T0, "sequence_id": "seq", "sequence_step": 2}
    write(warehouse_engine, SendRegistered(a, subject="new", registered_at=T0 + 5, **send))
    write(warehouse_engine, SendRegistered(a, subject="old", registered_at=T0 + 1, **send))
    write(warehouse_engine, SendRegistered(b, subject="b", registered_at=T0, tracking=False,
                                           **send))
    write(warehouse_engine, SendRegistered(never, subject="n", registered_at=T0, **send))
    for revision in (3, 1, 2):  # the newest first
        write(warehouse_engine, EmailState(a, True, revision, revision, 0, revision + 1,
                                           T0 + MIN, T0 + revision * MIN, T0 + revision * MIN,
                                           revision=revision))
    write(warehouse_engine, EmailState(b, True, 1, 0, 1, 1, T0, T0, None, revision=1))
    for event in [Engagement("r1", a, "reply", T0), Engagement("r1", a, "reply", T0),
                  Engagement("r2", a, "reply", T0 + 1), Engagement("u1", b, "unsubscribe", T0)]:
        write(warehouse_engine, event)

    def final(table: str, email_id: str) -> list[dict]:
        return warehouse_engine.query(f"SELECT * FROM {table} FINAL WHERE email_id = %(id)s",
                                      {"id": email_id})

    found = reads.emails(warehouse_engine, [never, b, "unknown", a])
    assert list(found) == [never, b, a]  # the registered ones, in the order asked
    for email_id, item in found.items():
        assert item == reads.email_opens(warehouse_engine, email_id)
        (sent,) = final("sends", email_id)
        assert {k: item[k] for k in ("subject", "person_id", "template_id", "sequence_id",
                                     "sequence_step")} == {
            k: sent[k] for k in ("subject", "person_id", "template_id", "sequence_id",
                                 "sequence_step")}
        assert item["tracking"] is bool(sent["tracking"])
        states = final("email_state", email_id)
        assert item["open_count"] == (states[0]["open_count"] if states else 0)
        assert item["raw_load_count"] == (states[0]["raw_load_count"] if states else 0)
        engaged = final("engagement", email_id)
        assert item["replies"] == sum(r["kind"] == "reply" for r in engaged)
        assert item["unsubscribes"] == sum(r["kind"] == "unsubscribe" for r in engaged)
    assert (found[a]["subject"], found[a]["open_count"], found[a]["replies"]) == ("new", 3, 2)
    assert found[a]["last_opened_at"] == "2026-01-05T09:03:00.000Z"
    assert (found[b]["tracking"], found[b]["unsubscribed"], found[b]["opened"]) == (
        False, True, True)
    assert (found[never]["opened"], found[never]["open_count"]) == (False, 0)
    # a folder page's emails: their rows as its rounds read them, the state it ranked by
    rows = reads.read_by_key(warehouse_engine, (a, b))
    assert rows.states[a]["open_count"] == 3
    known = reads.Newest()
    known.keep(rows, a, {**rows.states[a], "open_count": 99})
    given = reads.emails(warehouse_engine, [a, b], known)
    assert given[a] == {**found[a], "open_count": 99}
    assert given[b] == found[b]  # not known: read


def test_profile_folder_follows_a_send_registered_again_elsewhere(warehouse_engine,
                                                                  profile) -> None:
    """sends_by_profile keeps the old profile's row of a send registered again under
    another: the newest send decides whose folder lists the email."""
    moved, stays = f"{profile}-moved", f"{profile}-stays"
    other = f"{profile}-other"
    opened(warehouse_engine, moved, profile, T0 + MIN)
    opened(warehouse_engine, stays, profile, T0)
    write(warehouse_engine, SendRegistered(moved, other, "candidate", "c1", "t1", "s", T0,
                                           registered_at=T0 + 1))
    assert ids(reads.opened_folder(warehouse_engine, profile_id=profile)) == [stays]
    assert ids(reads.opened_folder(warehouse_engine, profile_id=other)) == [moved]

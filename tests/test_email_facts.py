"""The per-email facts the comparisons read (``warehouse.facts``), on chDB and on 18.16.

They must equal what the raw tables say whatever order sends, states and engagement arrive
in, redelivered or not; an existing warehouse must get them from its tables (migration 3);
and an erasure must take them away for good.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from dashboards import analytics
from dashboards.params import Filters
from opentrack.events import EmailState, Engagement, Event, SendRegistered
from tests.test_analytics_world import (
    DAY,
    KEYS,
    MIN,
    email_truth,
    group_truth,
    load_events,
    make_workload,
    new_tag,
    pipeline_events,
)
from warehouse import facts
from warehouse.engines import ChdbEngine, Engine, ServerEngine
from warehouse.erasure import erase_emails
from warehouse.loader import SINKS, STATE_COLUMNS, rows_by_table, write_batch
from warehouse.schema import migrate


def facts_of(engine: Engine, email_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    rows = engine.query(
        f"SELECT {', '.join(facts.FACT_COLUMNS)} FROM email_facts FINAL "
        "WHERE email_id IN %(ids)s", {"ids": tuple(email_ids)})
    return {row["email_id"]: tuple(row[c] for c in facts.FACT_COLUMNS) for row in rows}


def expected_facts(events: list[Event]) -> dict[str, tuple[Any, ...]]:
    """The facts straight from the events: the newest send, the newest state, engagement."""
    sends: dict[str, SendRegistered] = {}
    states: dict[str, EmailState] = {}
    engaged: dict[str, set[str]] = {}
    for e in events:
        if isinstance(e, SendRegistered):
            if e.email_id not in sends or e.registered_at >= sends[e.email_id].registered_at:
                sends[e.email_id] = e
        elif isinstance(e, EmailState):
            if e.email_id not in states or e.revision >= states[e.email_id].revision:
                states[e.email_id] = e
        elif isinstance(e, Engagement):
            engaged.setdefault(e.email_id, set()).add(e.kind)
    out = {}
    for email_id, s in sends.items():
        st = states.get(email_id, EmailState(email_id))
        kinds = engaged.get(email_id, set())
        replied, unsubscribed = int("reply" in kinds), int("unsubscribe" in kinds)
        out[email_id] = (
            email_id, s.profile_id, s.person_type, s.person_id, s.template_id, s.subject,
            s.sequence_id or "", s.sequence_step or 0, s.sent_at, int(s.tracking),
            s.registered_at, st.open_count, st.human_open_count,
            st.first_human_opened_at or 0, st.last_human_opened_at or 0, st.revision,
            replied, unsubscribed, s.registered_at + st.revision + replied + unsubscribed,
        )
    return out


def test_any_order_and_redelivery_give_the_facts_of_the_newest_rows(warehouse_engine) -> None:
    """Every event of a workload in a shuffled order (states before their sends, old state
    revisions after new ones), in batches of random sizes, a third of them delivered twice,
    and some sends registered again later with another subject."""
    workload = make_workload(new_tag("fo"), emails=400, seed=5, untracked_every=10)
    events = pipeline_events(workload)
    again = [SendRegistered(**{**s.to_dict(), "subject": "registered again",
                               "registered_at": s.registered_at + 1})
             for s in workload.sends[::7]]
    events += again
    rnd = random.Random(3)
    rnd.shuffle(events)
    position = 0
    while position < len(events):
        size = rnd.randint(1, 300)
        batch = events[position:position + size]
        load_events(warehouse_engine, batch)
        if rnd.random() < 0.33:
            load_events(warehouse_engine, batch)
        position += size
    email_ids = [s.email_id for s in workload.sends]
    want = expected_facts(events)
    assert facts_of(warehouse_engine, email_ids) == want
    assert sum(row[5] == "registered again" for row in want.values()) == len(again)
    assert sum(row[12] > 0 for row in want.values()) > 100  # opened by a person


def test_a_state_before_its_send_then_an_old_state_then_a_reply(warehouse_engine) -> None:
    tag = new_tag("fs")
    email_id = f"{tag}-e1"
    send = SendRegistered(email_id, f"{tag}-p", "candidate", "c1", f"{tag}-t", "Hi",
                          sent_at=1_900_000_000_000, registered_at=1_900_000_000_001)
    at = send.sent_at + 5 * MIN
    newer = EmailState(email_id, True, 2, 1, 1, 3, at - MIN, at, at, revision=4,
                       first_human_opened_at=at)
    older = EmailState(email_id, True, 1, 0, 1, 1, at - MIN, at - MIN, None, revision=2)

    load_events(warehouse_engine, [newer])
    assert facts_of(warehouse_engine, [email_id]) == {}  # no send, no row yet
    load_events(warehouse_engine, [send])
    row = facts_of(warehouse_engine, [email_id])[email_id]
    assert row[11:17] == (2, 1, at, at, 4, 0)  # counters, times, revision, replied
    load_events(warehouse_engine, [older])
    assert facts_of(warehouse_engine, [email_id])[email_id] == row
    load_events(warehouse_engine, [Engagement(f"{tag}-r", email_id, "reply", at + DAY)] * 2)
    replied = facts_of(warehouse_engine, [email_id])[email_id]
    assert replied[16:] == (1, 0, send.registered_at + 4 + 1)


def test_a_stale_computation_written_last_loses(warehouse_engine) -> None:
    """Two writers racing on one email (a reload beside the live loader): one computed the
    facts before the other's rows were in, and inserts them last. The version keeps the
    computation that saw more."""
    tag = new_tag("fr")
    email_id = f"{tag}-e1"
    send = SendRegistered(email_id, f"{tag}-p", "contact", "c1", f"{tag}-t", "Hi",
                          sent_at=1_900_000_000_000, registered_at=1_900_000_000_001)
    load_events(warehouse_engine, [send])
    stale = warehouse_engine.query(facts.select("email_id = %(id)s"), {"id": email_id})
    load_events(warehouse_engine, [EmailState(email_id, True, 1, 1, 0, 1, 5, 5, 5,
                                              revision=1, first_human_opened_at=5)])
    warehouse_engine.insert("email_facts", facts.FACT_COLUMNS,
                            [tuple(r[c] for c in facts.FACT_COLUMNS) for r in stale])
    assert facts_of(warehouse_engine, [email_id])[email_id][11:16] == (1, 1, 5, 5, 1)


def test_refresh_splits_long_id_lists_under_the_statement_limit(warehouse_engine) -> None:
    tag = new_tag("fl")
    sends = [SendRegistered(f"{tag}-{'x' * 100}-{i}", f"{tag}-p", "contact", f"c{i}",
                            f"{tag}-t", "Hi", sent_at=1_900_000_000_000 + i)
             for i in range(3000)]  # about 350 KB of ids: more than one statement may hold
    load_events(warehouse_engine, sends, batch=len(sends))
    rows = warehouse_engine.query(
        "SELECT count() AS n FROM email_facts FINAL WHERE startsWith(email_id, %(tag)s)",
        {"tag": tag})
    assert rows[0]["n"] == 3000


def test_refresh_matching_a_staged_bulk_insert(warehouse_engine) -> None:
    """A writer that bulk-inserts the raw tables from a staging table, without
    ``write_batch``, names the emails by a query and gets their facts the same."""
    workload = make_workload(new_tag("fb"), emails=80, seed=21)
    events = pipeline_events(workload)
    tables = rows_by_table((e.topic, e.to_bytes()) for e in events)
    stage = new_tag("stage")
    warehouse_engine.execute(f"CREATE TABLE {stage} (email_id Nullable(String)) ENGINE = Memory")
    try:
        for table, columns, _, _ in SINKS.values():
            warehouse_engine.insert(table, columns, tables[table])
        warehouse_engine.insert(stage, ["email_id"], [(s.email_id,) for s in workload.sends])
        assert facts_of(warehouse_engine, [s.email_id for s in workload.sends]) == {}
        facts.refresh_matching(warehouse_engine, f"SELECT email_id FROM {stage}")
    finally:
        warehouse_engine.execute(f"DROP TABLE {stage}")
    assert facts_of(warehouse_engine, [s.email_id for s in workload.sends]) == expected_facts(
        events)


def test_erasure_removes_the_facts_and_late_rows_bring_none_back(warehouse_engine) -> None:
    workload = make_workload(new_tag("fe"), emails=60, seed=9)
    load_events(warehouse_engine, pipeline_events(workload))
    person = workload.sends[0].person_id
    gone = [s.email_id for s in workload.sends if s.person_id == person]
    kept = [s.email_id for s in workload.sends if s.person_id != person]
    assert gone and kept and len(facts_of(warehouse_engine, gone)) == len(gone)

    erase_emails(warehouse_engine, gone)
    raw = warehouse_engine.query("SELECT count() AS n FROM email_facts WHERE email_id IN %(ids)s",
                                 {"ids": tuple(gone)})
    assert raw[0]["n"] == 0  # every version, not only the newest
    assert len(facts_of(warehouse_engine, kept)) == len(kept)
    late = [EmailState(gone[0], True, 9, 9, 0, 9, 1, 1, 1, revision=99),
            Engagement(new_tag("late"), gone[0], "reply", 2)]
    write_batch(warehouse_engine, rows_by_table(((e.topic, e.to_bytes()) for e in late),
                                                erased=set(gone)))
    assert facts_of(warehouse_engine, gone) == {}


@contextmanager
def fresh_database(engine: Engine) -> Iterator[Engine]:
    """An empty database beside the session's warehouse, and an engine that works in it
    (chDB allows one session per process, so that one switches databases meanwhile)."""
    name = new_tag("db")
    engine.execute(f"CREATE DATABASE {name}")
    try:
        if isinstance(engine, ChdbEngine):
            engine.execute(f"USE {name}")
            try:
                yield engine
            finally:
                engine.execute("USE default")
        else:
            assert isinstance(engine, ServerEngine)
            other = ServerEngine(urlsplit(engine.url)._replace(path=f"/{name}").geturl())
            try:
                yield other
            finally:
                other.close()
    finally:
        engine.execute(f"DROP DATABASE {name}")


def test_migration_3_fills_the_facts_of_an_existing_warehouse(warehouse_engine) -> None:
    """A warehouse written before the facts existed (its states without the first human
    open) gets them from its tables, and the comparison says what the workload did."""
    workload = make_workload(new_tag("fm"), emails=500, seed=13, untracked_every=15)
    events = pipeline_events(workload)
    old_state_columns = STATE_COLUMNS[:STATE_COLUMNS.index("first_human_opened_at")]
    with fresh_database(warehouse_engine) as engine:
        assert migrate(engine, upto=2) == [1, 2]
        tables = rows_by_table((e.topic, e.to_bytes()) for e in events)
        for table, columns, _, _ in SINKS.values():  # what the loader wrote before 3
            if table == "email_state":
                columns = old_state_columns
            engine.insert(table, columns, [row[:len(columns)] for row in tables[table]])
        assert migrate(engine, upto=3) == [3]

        truth = email_truth(workload)
        first_human = {r["email_id"]: r["first_human_opened_at"] for r in engine.query(
            "SELECT email_id, first_human_opened_at FROM email_state FINAL")}
        assert first_human == {k: t.first_human_at or 0 for k, t in truth.items()
                               if k in first_human}
        assert facts_of(engine, list(truth)) == expected_facts(
            [e for e in events if not isinstance(e, EmailState)]
            + [_with_first_human(e, truth) for e in events if isinstance(e, EmailState)])
        templates = tuple(sorted({s.template_id for s in workload.sends}))
        df = analytics.compare(engine, "template", Filters(template_ids=templates))
        want = group_truth(truth, KEYS["template"])
        assert sorted(df["key"]) == sorted(want)
        for row in df.to_dict("records"):
            expected = want[row["key"]]
            assert {k: row[k] for k in analytics.COUNTS} == {
                k: expected[k] for k in analytics.COUNTS}
            assert row["time_to_first_human_open_median_s"] * 1000 == expected["median_ms"]
        assert migrate(engine, upto=3) == []


def _with_first_human(state: EmailState, truth: dict) -> EmailState:
    """The state as migration 3 leaves it: the first human open taken from the opens (only
    the newest revision's matters, and that one is the email's truth)."""
    return EmailState(**{**state.to_dict(),
                         "first_human_opened_at": truth[state.email_id].first_human_at})


@pytest.mark.parametrize("ids", [[], ["a"], ["b" * 200_000]])
def test_chunks_keep_every_id_once(ids: list[str]) -> None:
    assert [i for chunk in facts._chunks(ids) for i in chunk] == ids

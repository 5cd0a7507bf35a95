"""The comparison, follow-ups and timing on chDB and on the ClickHouse 18.16 server.

Two data sets: a small hand-made one whose every number is written out below, and a
generated workload whose numbers come from its truth (``tests.test_analytics_world``).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from dashboards import analytics, stats
from dashboards.params import BadParameter, Filters
from tests.test_analytics_world import (
    DAY,
    HOUR,
    KEYS,
    MIN,
    T0,
    build_exact,
    email_truth,
    group_truth,
    load_events,
    make_workload,
    new_tag,
    pipeline_events,
)


@pytest.fixture(scope="module")
def exact(warehouse_engine) -> tuple:
    x = build_exact(new_tag("ex"))
    load_events(warehouse_engine, x.events)
    return warehouse_engine, x, Filters(template_ids=tuple(x.id(t) for t in "ABC"))


def by_key(df: pd.DataFrame) -> dict[str, dict]:
    return {row["key"]: row for row in df.to_dict("records")}


def test_every_number_of_a_template(exact) -> None:
    engine, x, scope = exact
    df = analytics.compare(engine, "template", scope)
    assert list(df["key"]) == [x.id("B"), x.id("A"), x.id("C")]  # most sends first
    a = by_key(df)[x.id("A")]
    assert {k: a[k] for k in (
        "template_id", "sent", "tracked", "opened", "human_opened", "machine_only_opened",
        "total_opens", "human_opens", "machine_opens", "replies", "unsubscribes")} == {
        "template_id": x.id("A"), "sent": 40, "tracked": 40, "opened": 25, "human_opened": 20,
        "machine_only_opened": 5, "total_opens": 29, "human_opens": 23, "machine_opens": 6,
        "replies": 2, "unsubscribes": 1,
    }
    assert a["open_rate"] == 25 / 40 and a["human_open_rate"] == 0.5
    assert a["opens_per_opener"] == 29 / 25 and a["human_opens_per_opener"] == 23 / 20
    assert a["reply_rate"] == 2 / 40 and a["unsubscribe_rate"] == 1 / 40
    assert (a["human_open_rate_ci_lo"], a["human_open_rate_ci_hi"]) == pytest.approx(
        (0.352, 0.648), abs=5e-4)
    assert (a["reply_rate_ci_lo"], a["reply_rate_ci_hi"]) == stats.wilson_interval(2, 40)
    # first human opens 1..20 minutes after sending: exact median = 11th, p90 = 19th
    assert a["time_to_first_human_open_median_s"] == 660
    assert a["time_to_first_human_open_p90_s"] == 1140
    b = by_key(df)[x.id("B")]
    assert (b["sent"], b["tracked"], b["human_opened"], b["replies"], b["unsubscribes"]) == (
        42, 40, 6, 1, 2)
    assert b["human_open_rate"] == 6 / 40 and b["reply_rate"] == 1 / 42
    assert (b["time_to_first_human_open_median_s"], b["time_to_first_human_open_p90_s"]) == (
        2400, 3600)
    c = by_key(df)[x.id("C")]
    assert (c["sent"], c["human_opened"], c["time_to_first_human_open_median_s"]) == (
        10, 3, 86400)


def test_significance_against_the_largest_or_a_named_baseline(exact) -> None:
    engine, x, scope = exact
    df = by_key(analytics.compare(engine, "template", scope))
    a, b, c = (df[x.id(t)] for t in "ABC")
    assert b["is_baseline"] and b["p_value"] != b["p_value"]  # NaN: not tested
    assert a["metric"] == "human_open_rate" and a["test"] == "z"
    assert a["p_value"] == pytest.approx(stats.two_proportion_test(20, 40, 6, 40).p_value)
    assert a["p_value"] < 0.01
    assert c["test"] == "fisher"
    assert c["p_value"] == pytest.approx(stats.two_proportion_test(3, 10, 6, 40).p_value)
    assert [a["p_adjusted"], c["p_adjusted"]] == pytest.approx(
        stats.holm([a["p_value"], c["p_value"]]))
    assert a["significant"] and not c["significant"] and not b["significant"]
    assert pd.isna(a["warning"]) and pd.isna(b["warning"])
    assert "10 sends" in c["warning"]

    named = by_key(analytics.compare(engine, "template", scope, baseline=x.id("A")))
    assert named[x.id("A")]["is_baseline"] and not named[x.id("B")]["is_baseline"]
    assert named[x.id("C")]["p_value"] == pytest.approx(
        stats.two_proportion_test(3, 10, 20, 40).p_value)

    replies = by_key(analytics.compare(engine, "template", scope, metric="reply_rate"))
    assert replies[x.id("B")]["is_baseline"]  # 42 sends: the largest
    assert "1 of 42 sends replied to" in replies[x.id("B")]["warning"]


def test_subjects_sequences_and_steps(exact) -> None:
    engine, x, scope = exact
    subjects = by_key(analytics.compare(engine, "subject", scope))
    assert {k: (v["sent"], v["human_opened"]) for k, v in subjects.items()} == {
        x.id("hello"): (20, 10), x.id("hi"): (20, 10), x.id("b"): (42, 6), x.id("c"): (10, 3)}
    sequences = analytics.compare(engine, "sequence", scope)
    assert list(sequences["key"]) == [x.id("S")]
    assert sequences.iloc[0][["sent", "tracked", "human_opened", "replies"]].tolist() == [
        82, 80, 26, 3]
    steps = analytics.compare(engine, "sequence_step", scope)
    assert list(steps["key"]) == [f"{x.id('S')}/1", f"{x.id('S')}/2"]
    assert list(steps["sequence_step"]) == [1, 2] and list(steps["sent"]) == [40, 42]
    assert list(steps["unsubscribes"]) == [1, 2]


def test_filters(exact) -> None:
    engine, x, scope = exact

    def sent(**kw) -> dict[str, int]:
        f = Filters(template_ids=scope.template_ids, **kw)
        return {k: v["sent"] for k, v in by_key(analytics.compare(engine, "template", f)).items()}

    assert sent(person_type="contact") == {x.id("C"): 10}
    assert sent(profile_id=x.id("p1")) == {x.id("A"): 40, x.id("B"): 42}
    assert sent(start=T0 + HOUR) == {x.id("C"): 10}
    assert sent(end=T0 + HOUR) == {x.id("A"): 40, x.id("B"): 42}
    assert sent(start=T0 + 3 * DAY) == {}
    only = Filters(sequence_ids=(x.id("S"),))
    assert set(by_key(analytics.compare(engine, "template", only))) == {x.id("A"), x.id("B")}


def test_bad_options(exact) -> None:
    engine, x, scope = exact
    for kwargs, field in (({"by": "weekday"}, "by"), ({"metric": "clicks"}, "metric"),
                          ({"baseline": "nope"}, "baseline")):
        with pytest.raises(BadParameter) as caught:
            analytics.compare(engine, **{"by": "template", "filters": scope, **kwargs})
        assert caught.value.field == field
    empty = analytics.compare(engine, "template", Filters(template_ids=(x.id("none"),)))
    assert empty.empty and "p_value" in empty.columns


def test_follow_up_queue(exact) -> None:
    engine, x, _ = exact
    scope = Filters(profile_id=x.id("p1"))
    df = analytics.follow_ups(engine, scope)
    a, b = x.id("A"), x.id("B")
    # A0 and A5 got replies, A3 an unsubscribe, B0 a reply: not in the queue
    human = {f"{a}{i}": (T0 + (i + 1) * MIN, 1) for i in range(20)}
    human[f"{a}0"] = (T0 + 2 * HOUR, 3)
    human[f"{a}4"] = (T0 + 6 * HOUR, 2)
    human.update({f"{b}{i}": (T0 + (i + 1) * 10 * MIN, 1) for i in range(6)})
    for gone in (f"{a}0", f"{a}5", f"{a}3", f"{b}0"):
        del human[gone]
    recent = sorted(human, key=lambda e: (-human[e][0], -human[e][1], e))
    assert list(df["email_id"]) == recent
    assert df.iloc[0]["last_human_opened_at"] == pd.Timestamp(T0 + 6 * HOUR, unit="ms", tz="UTC")
    assert df.iloc[0]["human_open_count"] == 2 and df.iloc[0]["sequence_step"] == 1
    reopened = analytics.follow_ups(engine, scope, sort="reopened", limit=3)
    assert list(reopened["email_id"]) == [f"{a}4", *recent[1:3]]
    assert list(analytics.follow_ups(engine, scope, limit=5, offset=5)["email_id"]) == recent[5:10]
    counts = analytics.follow_up_counts(engine, Filters(template_ids=(x.id("C"),)))
    assert counts.to_dict("records") == [{"profile_id": x.id("p2"), "follow_ups": 3}]


def test_timing(exact) -> None:
    engine, x, scope = exact
    df = analytics.timing(engine, scope)
    assert len(df) == 168 and df["sent"].sum() == 92 and df["tracked"].sum() == 90
    tuesday_0 = df[(df["weekday"] == 2) & (df["hour"] == 0)].iloc[0]  # A and B sent then
    assert (tuesday_0["sent"], tuesday_0["human_opened"], tuesday_0["weekday_name"]) == (
        82, 26, "Tue")
    # human opens of A and B within the first hour after T0 (Tuesday 00:00 UTC)
    assert tuesday_0["human_opens"] == 20 + 5 and tuesday_0["machine_opens"] == 6
    berlin = analytics.timing(engine, scope, tz="Europe/Berlin")
    assert berlin[(berlin["weekday"] == 2) & (berlin["hour"] == 1)].iloc[0]["sent"] == 82
    assert berlin["human_opens"].sum() == df["human_opens"].sum() == 23 + 6 + 3


# --- a generated workload, checked against its truth ---------------------------------------
@pytest.fixture(scope="module")
def world(warehouse_engine) -> tuple:
    workload = make_workload(new_tag("wl"), emails=3000, seed=11, untracked_every=25)
    load_events(warehouse_engine, pipeline_events(workload))
    templates = tuple(sorted({s.template_id for s in workload.sends}))
    return warehouse_engine, workload, email_truth(workload), Filters(template_ids=templates)


def _check_against_truth(df: pd.DataFrame, expected: dict[str, dict], metric: str) -> None:
    assert sorted(df["key"]) == sorted(expected)
    rows = by_key(df)
    for key, want in expected.items():
        row = rows[key]
        for name in ("sent", "tracked", "opened", "human_opened", "total_opens", "human_opens",
                     "replies", "unsubscribes"):
            assert row[name] == want[name], (key, name)
        assert row["machine_opens"] == want["total_opens"] - want["human_opens"]
        for rate, (successes, trials, _) in analytics.RATES.items():
            assert row[rate] == want[successes] / want[trials], (key, rate)
            assert (row[f"{rate}_ci_lo"], row[f"{rate}_ci_hi"]) == pytest.approx(
                stats.wilson_interval(want[successes], want[trials]))
        for q in ("median", "p90"):
            assert row[f"time_to_first_human_open_{q}_s"] * 1000 == want[f"{q}_ms"], (key, q)
    successes, trials, _ = analytics.RATES[metric]
    ordered = sorted(expected, key=lambda k: (-expected[k]["sent"], k))
    if "/" in ordered[0]:  # steps are shown in sequence order
        ordered = sorted(expected, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/")[1])))
    base = max(ordered, key=lambda k: (expected[k][trials], -ordered.index(k)))
    assert rows[base]["is_baseline"]
    others = [k for k in ordered if k != base]
    p_values = [stats.two_proportion_test(expected[k][successes], expected[k][trials],
                                          expected[base][successes], expected[base][trials]
                                          ).p_value for k in others]
    for key, p, adjusted in zip(others, p_values, stats.holm(p_values), strict=True):
        assert rows[key]["p_value"] == pytest.approx(p, rel=1e-9, abs=1e-300)
        assert rows[key]["p_adjusted"] == pytest.approx(adjusted, rel=1e-9, abs=1e-300)
        assert rows[key]["significant"] == (adjusted < 0.05)


@pytest.mark.parametrize("by", ["template", "subject", "sequence", "sequence_step"])
def test_workload_numbers_equal_the_truth(world, by: str) -> None:
    engine, _, truth, scope = world
    for metric in ("human_open_rate", "reply_rate"):
        df = analytics.compare(engine, by, scope, metric=metric)
        _check_against_truth(df, group_truth(truth, KEYS[by]), metric)


def test_workload_with_filters(world) -> None:
    engine, workload, truth, scope = world
    profile = sorted({s.profile_id for s in workload.sends})[0]
    start = min(s.sent_at for s in workload.sends) + 3 * DAY
    end = start + 5 * DAY
    for filters, keep in (
        (Filters(template_ids=scope.template_ids, person_type="contact"),
         lambda s: s.person_type == "contact"),
        (Filters(template_ids=scope.template_ids, profile_id=profile),
         lambda s: s.profile_id == profile),
        (Filters(template_ids=scope.template_ids, start=start, end=end),
         lambda s: start <= s.sent_at < end),
    ):
        subset = {k: t for k, t in truth.items() if keep(t.send)}
        assert subset and len(subset) < len(truth)
        df = analytics.compare(engine, "template", filters)
        _check_against_truth(df, group_truth(subset, KEYS["template"]), "human_open_rate")


def test_workload_follow_ups(world) -> None:
    engine, workload, truth, scope = world
    waiting = {k: t for k, t in truth.items()
               if t.human_open_count and not t.replied and not t.unsubscribed}
    expected = sorted(waiting, key=lambda k: (-waiting[k].last_human_at,
                                              -waiting[k].human_open_count, k))
    got = analytics.follow_ups(engine, scope, limit=1000)
    assert 100 < len(expected) <= 1000
    assert list(got["email_id"]) == expected
    assert list(got["human_open_count"]) == [waiting[k].human_open_count for k in expected]
    assert analytics.follow_up_counts(engine, scope)["follow_ups"].sum() == len(expected)


@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_workload_timing(world, tz: str) -> None:
    engine, _, truth, scope = world
    zone = ZoneInfo(tz)

    def slot(ms: int) -> tuple[int, int]:
        moment = datetime.fromtimestamp(ms / 1000, UTC).astimezone(zone)
        return moment.isoweekday(), moment.hour

    human = Counter(slot(at) for t in truth.values() for at in t.human_open_times)
    machine = Counter(slot(at) for t in truth.values() for at in t.machine_open_times)
    sent = Counter(slot(t.send.sent_at) for t in truth.values())
    opened = Counter(slot(t.send.sent_at) for t in truth.values() if t.human_open_count)
    df = analytics.timing(engine, scope, tz=tz)
    for row in df.to_dict("records"):
        cell = (row["weekday"], row["hour"])
        assert (row["human_opens"], row["machine_opens"], row["sent"], row["human_opened"]) == (
            human[cell], machine[cell], sent[cell], opened[cell]), cell

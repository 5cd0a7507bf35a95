"""The labelled workload and the accuracy report: deterministic, realistic in shape, its
truth self-consistent, and the real classifier accurate on it (offline, no services)."""

from __future__ import annotations

import ipaddress
import time
from collections import Counter

import pytest

from ingest.privacy import anonymise
from opentrack.accuracy import (
    classify_offline,
    format_report,
    report,
    run_state_machine,
)
from opentrack.events import LOAD_CLASSES
from opentrack.truth import counted_verdicts
from opentrack.workload import TEMPLATES, Workload, generate
from streams import state

START = 1_700_000_000_000  # 2023-11-14T22:13:20Z
DAY = 86_400_000
WINDOW_MS = 60_000
SCANNER_SECONDS = 10.0
N = 3000
KINDS = {
    "desktop", "phone", "webmail", "gmail_proxy", "yahoo_proxy", "apple_mpp", "scanner",
    "gmail_prefetch", "gmail_false_open", "crawler", "script", "repeat", "reopen",
}


@pytest.fixture(scope="module")
def workload() -> Workload:
    return generate(N, days=7, seed=11, start_ms=START, scanner_seconds=SCANNER_SECONDS)


@pytest.fixture(scope="module")
def verdicts(workload: Workload) -> dict[str, str]:
    return classify_offline(workload, SCANNER_SECONDS)


def oracle(workload: Workload) -> state.Classifier:
    """A classifier that knows the truth: the state machine must then match truth exactly."""
    truth = {load.raw.event_id: load.true_class for load in workload.loads}
    return lambda raw, sent_at: state.Verdict(truth[raw.event_id])


# --- the generator ----------------------------------------------------------------------
def test_same_seed_same_workload() -> None:
    first = generate(300, seed=5, start_ms=START)
    assert first == generate(300, seed=5, start_ms=START)
    other = generate(300, seed=6, start_ms=START)
    assert [s.email_id for s in other.sends] != [s.email_id for s in first.sends]


def test_no_start_means_the_same_workload_all_day() -> None:
    assert generate(50, days=2, seed=3) == generate(50, days=2, seed=3)


def test_sizes_and_shapes(workload: Workload) -> None:
    sends = {send.email_id: send for send in workload.sends}
    assert len(workload.sends) == len(sends) == N
    assert all(START <= s.sent_at < START + 7 * DAY for s in workload.sends)
    assert len(workload.loads) > N // 2
    times = [load.raw.received_at for load in workload.loads]
    assert times == sorted(times)
    event_ids = [load.raw.event_id for load in workload.loads]
    event_ids += [e.event_id for e in workload.engagements]
    assert len(set(event_ids)) == len(event_ids)
    for load in workload.loads:
        assert load.true_class in LOAD_CLASSES
        assert load.raw.received_at > sends[load.raw.email_id].sent_at
        network = ipaddress.ip_network(load.raw.client)  # strict: a prefix, not an address
        assert anonymise(str(network.network_address + 7)) == load.raw.client  # as the edge
        assert load.raw.user_agent.strip()


def test_what_is_sent_varies_like_a_crm(workload: Workload) -> None:
    sends = workload.sends
    assert len({s.profile_id for s in sends}) == 4
    assert {s.template_id for s in sends} == set(TEMPLATES)
    assert {s.person_type for s in sends} == {"candidate", "contact"}
    for template_id, template in TEMPLATES.items():
        used = [s for s in sends if s.template_id == template_id]
        assert {s.subject for s in used} == {subject for subject, _ in template.subjects}
        if template.person_type is not None:
            assert {s.person_type for s in used} == {template.person_type}
    assert {s.sequence_step for s in sends} == {None, 1, 2, 3}
    assert all((s.sequence_id is None) == (s.sequence_step is None) for s in sends)
    assert len({s.person_id for s in sends}) < len(sends)  # people get several emails


def test_engagement_rates_and_times(workload: Workload) -> None:
    sent_at = {send.email_id: send.sent_at for send in workload.sends}
    kinds = Counter(e.kind for e in workload.engagements)
    assert 0.05 < kinds["reply"] / N < 0.11
    assert 0.002 < kinds["unsubscribe"] / N < 0.025
    assert all(e.at > sent_at[e.email_id] for e in workload.engagements)


def test_every_kind_of_load_appears(workload: Workload) -> None:
    assert {load.kind for load in workload.loads} == KINDS
    assert len(set(workload.setups.values())) == 7


def test_delivery_time_fetchers_are_inside_the_scanner_window(workload: Workload) -> None:
    sent_at = {send.email_id: send.sent_at for send in workload.sends}
    for load in workload.loads:
        delay = load.raw.received_at - sent_at[load.raw.email_id]
        if load.kind in ("scanner", "gmail_prefetch"):
            assert delay <= SCANNER_SECONDS * 1000
            assert load.true_class == "machine"


def test_mpp_recipients_show_only_apple_prefetches(workload: Workload) -> None:
    person = {send.email_id: send.person_id for send in workload.sends}
    for load in workload.loads:
        if workload.setups[person[load.raw.email_id]] == "apple_mpp":
            assert load.kind in ("apple_mpp", "crawler", "script")
            assert load.raw.client.startswith("17.") or load.kind != "apple_mpp"


def test_repeated_loads_are_dropped_by_dedup(workload: Workload) -> None:
    counted: dict[str, bool] = {}
    for loads in workload.loads_by_email().values():
        counted |= counted_verdicts([load.raw for load in loads], WINDOW_MS)
    repeats = [load for load in workload.loads if load.kind == "repeat"]
    assert repeats and not any(counted[load.raw.event_id] for load in repeats)
    assert {load.true_class for load in repeats} <= {"human", "proxy"}


def test_truth_is_consistent(workload: Workload) -> None:
    truth = workload.truth(WINDOW_MS)
    loads = Counter(load.raw.email_id for load in workload.loads)
    assert set(truth) == {send.email_id for send in workload.sends}
    for email_id, s in truth.items():
        assert s["opened"] == (s["open_count"] > 0)
        assert s["open_count"] == s["human_open_count"] + s["machine_open_count"]
        assert s["raw_load_count"] == loads[email_id] >= s["open_count"]
        assert (s["first_opened_at"] is None) == (not s["opened"])
        assert (s["last_human_opened_at"] is None) == (s["human_open_count"] == 0)
        if s["opened"]:
            assert s["first_opened_at"] <= s["last_opened_at"]
    opened = sum(s["opened"] for s in truth.values()) / len(truth)
    human_opened = sum(s["human_open_count"] > 0 for s in truth.values()) / len(truth)
    assert 0.2 < human_opened < opened < 0.9


def test_twenty_thousand_loads_in_under_five_seconds() -> None:
    began = time.perf_counter()
    big = generate(18_000, seed=2, start_ms=START)
    assert len(big.loads) >= 20_000
    assert time.perf_counter() - began < 5.0


# --- the accuracy report ----------------------------------------------------------------
def test_offline_classifier_is_accurate(workload: Workload, verdicts: dict[str, str]) -> None:
    r = report(workload, verdicts, None, WINDOW_MS)
    assert r.unclassified == 0 and r.loads == len(workload.loads)
    for score in r.scores.values():
        assert score.actual > 100, score
        assert score.precision is not None and score.precision >= 0.98, format_report(r)
        assert score.recall is not None and score.recall >= 0.98, format_report(r)


def test_perfect_verdicts_and_states_give_a_clean_report(workload: Workload) -> None:
    truth = {load.raw.event_id: load.true_class for load in workload.loads}
    states = run_state_machine(workload, oracle(workload), WINDOW_MS)
    r = report(workload, truth, states, WINDOW_MS)
    assert all(s.precision == s.recall == 1.0 for s in r.scores.values())
    assert r.states is not None and r.states.emails == N
    assert r.states.emails_wrong == r.states.missing == 0
    assert sum(r.states.abs_errors.values()) == 0


def test_report_counts_a_wrong_verdict_and_a_wrong_state(workload: Workload) -> None:
    truth = {load.raw.event_id: load.true_class for load in workload.loads}
    human = next(load for load in workload.loads if load.true_class == "human")
    verdicts = truth | {human.raw.event_id: "machine"}
    expected = workload.truth(WINDOW_MS)
    states = dict(expected)
    states[human.raw.email_id] = expected[human.raw.email_id] | {"open_count": 99}
    del states[workload.sends[0].email_id]
    r = report(workload, verdicts, states, WINDOW_MS)
    assert r.confusion["human"]["machine"] == 1
    assert r.scores["human"].recall == (r.scores["human"].actual - 1) / r.scores["human"].actual
    assert r.scores["machine"].precision < 1.0 == r.scores["machine"].recall
    assert r.wrong_by_kind[human.kind][0] == 1
    assert r.states is not None and r.states.missing == 1
    assert r.states.field_errors["open_count"] >= 1
    assert r.states.abs_errors["open_count"] >= abs(99 - expected[human.raw.email_id]["open_count"])
    text = format_report(r)
    assert "precision" in text and "recall" in text and "open_count" in text


def test_pipeline_state_code_matches_truth_in_any_order(
    workload: Workload, verdicts: dict[str, str]
) -> None:
    """The worker's pure state code with the real rules, in time order and shuffled."""
    real = _verdict_lookup(verdicts)
    in_order = run_state_machine(workload, real, WINDOW_MS)
    shuffled = run_state_machine(workload, real, WINDOW_MS, shuffle_seed=4)
    assert _without_revision(in_order) == _without_revision(shuffled)
    r = report(workload, verdicts, in_order, WINDOW_MS)
    assert r.states is not None and r.states.emails_wrong <= 0.01 * N, format_report(r)


def _verdict_lookup(verdicts: dict[str, str]) -> state.Classifier:
    return lambda raw, sent_at: state.Verdict(verdicts[raw.event_id])


def _without_revision(states: dict[str, dict]) -> dict[str, dict]:
    return {k: {f: v for f, v in s.items() if f != "revision"} for k, s in states.items()}


def test_generator_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        generate(-1)
    with pytest.raises(ValueError):
        generate(10, days=0)
    empty = generate(0, start_ms=START)
    assert empty.sends == empty.loads == empty.engagements == []

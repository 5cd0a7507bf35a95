"""Dedup and replay logic against a brute-force reference, in every arrival order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from opentrack.events import RawOpen, SendRegistered
from opentrack.truth import counted_verdicts, expected_state
from streams.state import (
    MAX_LOADS,
    EmailRecord,
    Verdict,
    apply_load,
    apply_send,
    everyone_human,
)

WINDOW = 60_000
SENT = 1_000_000


def send(email_id: str = "e1") -> SendRegistered:
    return SendRegistered(email_id, "p", "candidate", "c1", "t", "s", SENT)


def load(eid: str, t: int, ua: str = "ua", client: str = "1.2.3.0/24") -> RawOpen:
    return RawOpen(eid, "e1", t, ua, client)


def by_agent(raw: RawOpen, sent_at: int | None) -> Verdict:
    return Verdict("machine", "bot") if raw.user_agent.startswith("bot") else Verdict("human")


def reference(loads: list[RawOpen], classify=by_agent) -> dict:
    return expected_state(loads, WINDOW, lambda r: classify(r, SENT).load_class == "machine")


def process(events: list, classify=by_agent) -> tuple[EmailRecord, dict[str, bool]]:
    """Run events through the state, round-tripping it through storage each time as the
    worker does; return the record and the last emitted dedup verdict per event id."""
    stored = None
    verdicts: dict[str, bool] = {}
    for event in events:
        record = EmailRecord.from_dict("e1", stored)
        if isinstance(event, SendRegistered):
            outcome = apply_send(record, event, classify, WINDOW)
        else:
            outcome = apply_load(record, event, classify, WINDOW)
        for opened in outcome.opens:
            verdicts[opened.event_id] = opened.counted
        stored = record.to_dict()
    return EmailRecord.from_dict("e1", stored), verdicts


def state_of(record: EmailRecord) -> dict:
    data = record.state.to_dict()
    data.pop("email_id")
    data.pop("revision")
    return data


def test_backbone_example() -> None:
    """Three loads from one client within a second and one from another: 2 opens, 4 loads."""
    loads = [load("a", SENT + 600_000), load("b", SENT + 600_300), load("c", SENT + 600_900),
             load("d", SENT + 600_500, client="9.9.9.0/24")]
    record, _ = process([send(), *loads])
    assert state_of(record) == reference(loads)
    assert record.state.open_count == 2 and record.state.raw_load_count == 4
    assert record.state.last_opened_at == SENT + 600_500


def test_window_edges() -> None:
    loads = [load("a", SENT), load("b", SENT + WINDOW - 1), load("c", SENT + WINDOW),
             load("d", SENT + 2 * WINDOW - 1), load("e", SENT + 2 * WINDOW)]
    record, _ = process([send(), *loads])
    assert record.state.open_count == 3  # a, c, e
    assert state_of(record) == reference(loads)


def test_replay_changes_nothing_and_says_again_what_it_made() -> None:
    first, second = load("a", SENT + 5), load("b", SENT + 600_000)
    record, _ = process([send(), first, second])
    before = record.to_dict()
    outcome = apply_load(record, first, by_agent, WINDOW)
    assert record.to_dict() == before
    # the outputs a killed worker may not have published, as they are now (same revisions)
    assert outcome.replay
    assert [o.event_id for o in outcome.opens] == ["a"]
    assert outcome.opens[0].revision == record.loads[0].revision
    assert outcome.state == record.state


def test_a_redelivered_late_load_says_again_the_loads_it_re_decided() -> None:
    # a, late, made b a repeat; a worker killed before publishing that sees a again and
    # must say b's new verdict too, or the warehouse keeps b counted (found by a SIGKILL)
    record, _ = process([send(), load("b", SENT + 70_000), load("a", SENT + 60_000)])
    outcome = apply_load(record, load("a", SENT + 60_000), by_agent, WINDOW)
    said = {o.event_id: (o.counted, o.revision) for o in outcome.opens}
    assert said == {"a": (True, record.state.revision), "b": (False, record.state.revision)}
    assert outcome.state == record.state
    # b itself made only its own verdict, which a has replaced since: a says it now
    outcome = apply_load(record, load("b", SENT + 70_000), by_agent, WINDOW)
    assert [o.event_id for o in outcome.opens] == ["b"]


def test_every_redelivery_after_a_kill_leaves_the_warehouse_as_the_state() -> None:
    """Loads in any time order; the outputs of the last events are lost (a SIGKILL after
    the changelog, before publishing) and those events come again: the newest row of every
    load, by revision, is the state's."""
    rnd = random.Random(5)
    for _ in range(200):
        loads = [load(f"l{i}", SENT + rnd.randrange(0, 5) * 20_000,
                      client=rnd.choice(["1.2.3.0/24", "9.9.9.0/24"])) for i in range(8)]
        rnd.shuffle(loads)
        cut = rnd.randrange(1, len(loads))
        stored, rows = None, {}
        for i, raw in enumerate([*loads, *loads[cut:]]):
            record = EmailRecord.from_dict("e1", stored)
            if stored is None:
                apply_send(record, send(), by_agent, WINDOW)
            outcome = apply_load(record, raw, by_agent, WINDOW)
            stored = record.to_dict()
            if cut <= i < len(loads):
                continue  # published at a commit that never came
            for o in outcome.opens:
                if o.revision >= rows.get(o.event_id, (0, None))[0]:
                    rows[o.event_id] = (o.revision, o.counted)
        final = EmailRecord.from_dict("e1", stored)
        assert rows == {k.event_id: (k.revision, k.counted) for k in final.loads}


def test_a_send_again_changes_nothing_and_says_again_every_load() -> None:
    loads = [load("a", SENT + 5), load("b", SENT + 600_000)]
    record, _ = process([send(), *loads])
    before = record.to_dict()
    outcome = apply_send(record, send(), by_agent, WINDOW)
    assert record.to_dict() == before
    assert outcome.replay and sorted(o.event_id for o in outcome.opens) == ["a", "b"]
    assert outcome.state == record.state


def test_a_replayed_load_of_an_email_without_state_emits_nothing() -> None:
    parked = load("a", SENT + 5)
    record, _ = process([parked])
    outcome = apply_load(record, parked, by_agent, WINDOW)
    assert outcome.replay and not outcome.opens and outcome.state is None


def test_loads_before_the_send_are_parked_then_processed() -> None:
    loads = [load("a", SENT + 100), load("b", SENT + 200_000)]
    record, verdicts = process([*loads, send()])
    assert state_of(record) == reference(loads)
    assert verdicts == {"a": True, "b": True}


def test_late_load_re_decides_a_later_one_and_emits_it() -> None:
    # b was counted when it came alone; a arrives late, 10 s before b: b becomes a repeat.
    record, verdicts = process([send(), load("b", SENT + 70_000), load("a", SENT + 60_000)])
    assert verdicts == {"a": True, "b": False}
    assert record.state.open_count == 1


def test_folding_keeps_counts_exact_and_drops_old_replays() -> None:
    loads = [load(f"x{i:05d}", SENT + i * 30_000) for i in range(MAX_LOADS + 50)]
    record, _ = process([send(), *loads])
    assert len(record.loads) == MAX_LOADS
    assert state_of(record) == reference(loads)
    assert apply_load(record, loads[0], by_agent, WINDOW).replay


def test_registering_the_same_send_twice_changes_nothing() -> None:
    record, _ = process([send(), load("a", SENT + 10)])
    revision = record.state.revision
    again = apply_send(record, send(), by_agent, WINDOW)
    assert again.replay and again.state.revision == revision == record.state.revision


def test_machine_loads_count_apart() -> None:
    loads = [load("a", SENT + 1000, ua="bot/1"), load("b", SENT + 500_000, ua="Mozilla")]
    record, _ = process([send(), *loads])
    assert record.state.machine_open_count == 1 and record.state.human_open_count == 1
    assert record.state.last_human_opened_at == SENT + 500_000


def test_everyone_human_default() -> None:
    assert everyone_human(load("a", 1), None).load_class == "human"


load_strategy = st.builds(
    lambda i, t, ua, c: load(f"ev{i}", SENT + t, ua=ua, client=c),
    st.integers(0, 30), st.integers(0, 400_000),
    st.sampled_from(["Mozilla", "bot/1", "Outlook"]), st.sampled_from(["1.1.1.0/24", "2.2.2.0/24"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(load_strategy, max_size=25), st.randoms(), st.integers(0, 25))
def test_any_order_any_replays_same_state_as_reference(loads, rnd, send_position) -> None:
    unique = list({raw.event_id: raw for raw in loads}.values())
    stream = unique + [rnd.choice(unique) for _ in range(len(unique) // 2)] if unique else []
    rnd.shuffle(stream)
    stream.insert(min(send_position, len(stream)), send())
    record, verdicts = process(stream)
    assert state_of(record) == reference(unique)
    # the last verdict emitted for each load is the reference's
    expected = reference_verdicts(unique)
    assert verdicts == expected


def reference_verdicts(loads: list[RawOpen]) -> dict[str, bool]:
    return counted_verdicts(loads, WINDOW)


def test_same_events_processed_twice_in_different_orders_agree() -> None:
    rnd = random.Random(7)
    loads = [load(f"r{i}", SENT + rnd.randrange(0, 3_600_000), ua=rnd.choice("AB"),
                  client=rnd.choice(["1.1.1.0/24", "3.3.3.0/24"])) for i in range(200)]
    a, _ = process([send(), *loads])
    shuffled = loads[:]
    rnd.shuffle(shuffled)
    b, _ = process([*shuffled[:50], send(), *shuffled[50:]])
    assert state_of(a) == state_of(b) == reference(loads)


def test_erased_email_keeps_nothing_and_drops_later_events() -> None:
    from streams.state import erase

    record = erase("e1")
    assert record.to_dict() == {"erased": True}
    restored = EmailRecord.from_dict("e1", record.to_dict())
    assert apply_load(restored, load("z", SENT + 5), by_agent, WINDOW).replay
    assert apply_send(restored, send(), by_agent, WINDOW).state is None
    assert restored.to_dict() == {"erased": True}


def test_replay_reclassify_changes_exactly_the_affected_loads() -> None:
    from streams.state import replay_load

    loads = [load("a", SENT + 600_000, ua="Thunderbird"), load("b", SENT + 900_000)]
    record, _ = process([send(), *loads])
    before = record.state.to_dict()

    def stricter(raw: RawOpen, sent_at: int | None) -> Verdict:
        if raw.user_agent == "Thunderbird":
            return Verdict("machine", "test_rule")
        return by_agent(raw, sent_at)

    same = replay_load(record, loads[1], stricter, WINDOW, reclassify=True)
    assert same.replay and not same.opens and same.state is None and same.reclassified == 0
    changed = replay_load(record, loads[0], stricter, WINDOW, reclassify=True)
    assert changed.reclassified == 1
    assert [(o.event_id, o.load_class, o.reason) for o in changed.opens] == [
        ("a", "machine", "test_rule")]
    assert changed.state.machine_open_count == 1 and changed.state.human_open_count == 1
    assert changed.state.revision == before["revision"] + 1
    again = replay_load(record, loads[0], stricter, WINDOW, reclassify=True)
    assert again.reclassified == 0 and again.state is None  # idempotent


def test_replay_emit_re_emits_without_change_and_unknown_loads_are_applied() -> None:
    from streams.state import replay_load

    known = load("a", SENT + 600_000)
    record, _ = process([send(), known])
    before = record.to_dict()
    out = replay_load(record, known, by_agent, WINDOW, emit=True)
    assert [o.event_id for o in out.opens] == ["a"] and out.state == record.state
    assert record.to_dict() == before
    fresh = replay_load(record, load("n", SENT + 700_000, ua="Other"), by_agent, WINDOW)
    assert fresh.state.raw_load_count == 2

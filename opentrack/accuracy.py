"""How right the pipeline is, measured against a labelled workload's truth.

Two questions, because they fail differently: is each load put in the right class
(precision and recall per class, a confusion matrix, which kinds of load go wrong), and does
each email show the right state (emails whose state differs from the truth, the summed
absolute error of each counter). The verdicts can come from the running stack or from
``classify_offline``; the states from the stack or from ``run_state_machine``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from opentrack.events import LOAD_CLASSES, EmailState, RawOpen, SendRegistered
from opentrack.workload import Workload
from streams import classify, state

COUNTERS = ("open_count", "human_open_count", "machine_open_count", "raw_load_count")
_EMPTY_STATE = EmailState(email_id="").to_dict()


@dataclass(frozen=True)
class ClassScore:
    """One class's row: how many loads truly are it, how many were called it, and both."""

    load_class: str
    actual: int
    predicted: int
    correct: int

    @property
    def precision(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.correct / self.actual if self.actual else None


@dataclass(frozen=True)
class StateErrors:
    """Per-email state against the truth."""

    emails: int
    emails_wrong: int  # any field differs
    missing: int  # no state at all (compared as the empty state)
    field_errors: dict[str, int]  # field -> emails where it differs
    abs_errors: dict[str, int]  # counter -> sum over emails of |state - truth|
    wrongly_opened: int  # shown as opened, truly not
    wrongly_unopened: int


@dataclass(frozen=True)
class AccuracyReport:
    confusion: dict[str, dict[str, int]]  # true class -> predicted class -> loads
    scores: dict[str, ClassScore]
    unclassified: int  # loads with no verdict
    wrong_by_kind: dict[str, tuple[int, int]]  # kind -> (misclassified, loads); all kinds
    states: StateErrors | None
    window_ms: int

    @property
    def loads(self) -> int:
        return sum(sum(row.values()) for row in self.confusion.values()) + self.unclassified


def report(
    workload: Workload,
    verdicts: Mapping[str, str],
    states: Mapping[str, Mapping] | None,
    window_ms: int,
) -> AccuracyReport:
    """Compare ``verdicts`` (event_id -> class) and ``states`` (email_id -> state fields, as
    EmailState.to_dict()) with the workload's truth; ``states`` None skips the state part."""
    confusion = {true: dict.fromkeys(LOAD_CLASSES, 0) for true in LOAD_CLASSES}
    loads_by_kind: Counter[str] = Counter()
    wrong_by_kind: Counter[str] = Counter()
    unclassified = 0
    for load in workload.loads:
        loads_by_kind[load.kind] += 1
        predicted = verdicts.get(load.raw.event_id)
        if predicted not in LOAD_CLASSES:
            unclassified += 1
            wrong_by_kind[load.kind] += 1
            continue
        confusion[load.true_class][predicted] += 1
        wrong_by_kind[load.kind] += predicted != load.true_class
    scores = {
        cls: ClassScore(
            cls,
            actual=sum(confusion[cls].values()),
            predicted=sum(row[cls] for row in confusion.values()),
            correct=confusion[cls][cls],
        )
        for cls in LOAD_CLASSES
    }
    return AccuracyReport(
        confusion=confusion,
        scores=scores,
        unclassified=unclassified,
        wrong_by_kind={kind: (wrong_by_kind[kind], n) for kind, n in loads_by_kind.items()},
        states=None if states is None else _state_errors(workload.truth(window_ms), states),
        window_ms=window_ms,
    )


def _state_errors(truth: Mapping[str, dict], states: Mapping[str, Mapping]) -> StateErrors:
    # the fields the states carry: a sink may keep fewer than the stream's state has
    carried = next(iter(states.values()), _EMPTY_STATE)
    fields = [name for name in next(iter(truth.values()), _EMPTY_STATE) if name in carried]
    field_errors = dict.fromkeys(fields, 0)
    abs_errors = dict.fromkeys(COUNTERS, 0)
    emails_wrong = missing = wrongly_opened = wrongly_unopened = 0
    for email_id, expected in truth.items():
        actual = states.get(email_id)
        if actual is None:
            missing += 1
            actual = _EMPTY_STATE
        wrong = [name for name in fields if actual.get(name) != expected[name]]
        emails_wrong += bool(wrong)
        for name in wrong:
            field_errors[name] += 1
        for name in COUNTERS:
            abs_errors[name] += abs((actual.get(name) or 0) - expected[name])
        wrongly_opened += bool(actual.get("opened")) and not expected["opened"]
        wrongly_unopened += expected["opened"] and not actual.get("opened")
    return StateErrors(
        emails=len(truth), emails_wrong=emails_wrong, missing=missing,
        field_errors=field_errors, abs_errors=abs_errors,
        wrongly_opened=wrongly_opened, wrongly_unopened=wrongly_unopened,
    )


def classify_offline(
    workload: Workload, scanner_seconds: float = classify.DEFAULT_SCANNER_SECONDS
) -> dict[str, str]:
    """event_id -> class from the real rules, without services (sent_at from the sends)."""
    rules = classify.Rules.load()
    sent_at = {send.email_id: send.sent_at for send in workload.sends}
    return {
        raw.event_id: classify.classify_load(
            classify.Load(raw.user_agent, raw.client, raw.received_at, sent_at.get(raw.email_id)),
            rules,
            scanner_seconds,
        ).load_class
        for raw in (load.raw for load in workload.loads)
    }


def run_state_machine(
    workload: Workload,
    classifier: state.Classifier,
    window_ms: int,
    shuffle_seed: int | None = None,
) -> dict[str, dict]:
    """email_id -> final state after feeding every send and load to the worker's pure state
    code, in time order, or shuffled (``shuffle_seed``) to check order independence."""
    events: list[tuple[int, int, SendRegistered | RawOpen]] = [
        (send.sent_at, 0, send) for send in workload.sends
    ]
    events += [(load.raw.received_at, 1, load.raw) for load in workload.loads]
    if shuffle_seed is None:
        events.sort(key=lambda e: (e[0], e[1]))
    else:
        random.Random(shuffle_seed).shuffle(events)
    records: dict[str, state.EmailRecord] = {}
    for _, _, event in events:
        record = records.setdefault(event.email_id, state.EmailRecord(event.email_id))
        if isinstance(event, SendRegistered):
            state.apply_send(record, event, classifier, window_ms)
        else:
            state.apply_load(record, event, classifier, window_ms)
    return {
        email_id: record.state.to_dict() if record.state else dict(_EMPTY_STATE)
        for email_id, record in records.items()
    }


def format_report(r: AccuracyReport) -> str:
    """A plain-text report: confusion matrix with precision/recall, misses by kind, state."""
    lines = [f"Load classification ({r.loads} loads, {r.unclassified} without a verdict)", ""]
    lines.append("true \\ predicted".ljust(18) + "".join(c.rjust(10) for c in LOAD_CLASSES)
                 + "recall".rjust(10) + "loads".rjust(9))
    for true in LOAD_CLASSES:
        cells = "".join(str(r.confusion[true][p]).rjust(10) for p in LOAD_CLASSES)
        score = r.scores[true]
        lines.append(true.ljust(18) + cells + _ratio(score.recall) + str(score.actual).rjust(9))
    lines.append("precision".ljust(18) + "".join(_ratio(r.scores[c].precision)
                                                for c in LOAD_CLASSES))
    lines += ["", "Misclassified loads by kind (what made them):"]
    for kind, (wrong, total) in sorted(r.wrong_by_kind.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {kind.ljust(20)}{wrong:>7} of {total}")
    if r.states is not None:
        s = r.states
        lines += [
            "",
            f"Per-email state against truth (dedup window {r.window_ms / 1000:g} s)",
            f"  emails                 {s.emails}",
            f"  emails with any error  {s.emails_wrong} ({_share(s.emails_wrong, s.emails)})",
            f"  emails without state   {s.missing}",
            f"  wrongly opened / unopened  {s.wrongly_opened} / {s.wrongly_unopened}",
            "  field                  emails wrong   sum |error|",
        ]
        for name, wrong in s.field_errors.items():
            abs_error = str(s.abs_errors[name]) if name in s.abs_errors else ""
            lines.append(f"  {name.ljust(22)} {wrong:>12} {abs_error:>13}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return ("-" if value is None else f"{value:.4f}").rjust(10)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"

"""A labelled workload in a warehouse, and what the analytics must say about it.

Shared by the analytics and dashboards tests (imported as ``tests.test_analytics_world``).
The warehouse is filled the way the pipeline fills it - the worker's pure state code turns
sends and loads into processed opens (with their revisions) and per-email states, and the
loader's ``write_batch`` writes them - with every load's class taken from the generator's
truth, so the expected numbers come from the workload alone (``opentrack.truth``), never
from the code under test.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask

from opentrack.events import EmailState, Engagement, Event, ProcessedOpen, RawOpen, SendRegistered
from opentrack.settings import Settings
from opentrack.truth import counted_verdicts
from opentrack.workload import LabelledLoad, Workload, generate
from streams import state
from warehouse.engines import Engine
from warehouse.loader import rows_by_table, write_batch

API_KEY = "test-api-key-0123456789"
SECRET = "test-secret-0123456789"
WINDOW_MS = 60_000
T0 = 1_893_456_000_000  # 2030-01-01T00:00:00Z, a Tuesday
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def new_tag(prefix: str = "an") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def tagged(workload: Workload, tag: str, untracked_every: int = 0, names: bool = True
           ) -> Workload:
    """The workload with its ids made unique to one test (the test engines are shared by the
    whole session, and the generator's ids repeat for a repeated seed), and every
    ``untracked_every``-th send registered without a pixel. ``names=False`` tags the email
    ids only, leaving template, sequence and profile names as they read."""

    def ident(value: str | None) -> str | None:
        return f"{tag}-{value}" if value else value

    def name(value: str | None) -> str | None:
        return ident(value) if names else value

    sends = [
        dataclasses.replace(s, email_id=ident(s.email_id), template_id=name(s.template_id),
                            sequence_id=name(s.sequence_id), profile_id=name(s.profile_id),
                            tracking=not (untracked_every and i % untracked_every == 0))
        for i, s in enumerate(workload.sends, start=1)
    ]
    loads = [
        LabelledLoad(dataclasses.replace(load.raw, email_id=ident(load.raw.email_id)),
                     load.true_class, load.kind)
        for load in workload.loads
    ]
    engagements = [dataclasses.replace(e, email_id=ident(e.email_id))
                   for e in workload.engagements]
    return Workload(sends, loads, engagements, workload.setups)


def make_workload(
    tag: str, emails: int = 3000, seed: int = 7, start_ms: int = 0, untracked_every: int = 0
) -> Workload:
    start = start_ms or 1_900_000_000_000 // DAY * DAY
    return tagged(generate(emails, days=14, seed=seed, start_ms=start), tag, untracked_every)


def pipeline_events(workload: Workload, window_ms: int = WINDOW_MS) -> list[Event]:
    """What the worker emits for the workload, in time order, every revision included."""
    true_class = {load.raw.event_id: load.true_class for load in workload.loads}

    def classify(raw: RawOpen, sent_at: int | None) -> state.Verdict:
        return state.Verdict(true_class[raw.event_id], reason="truth")

    timeline: list[tuple[int, int, Any]] = [(s.sent_at, 0, s) for s in workload.sends]
    timeline += [(load.raw.received_at, 1, load.raw) for load in workload.loads]
    timeline.sort(key=lambda item: (item[0], item[1]))
    records: dict[str, state.EmailRecord] = {}
    out: list[Event] = []
    for _, _, event in timeline:
        record = records.setdefault(event.email_id, state.EmailRecord(event.email_id))
        if isinstance(event, SendRegistered):
            outcome = state.apply_send(record, event, classify, window_ms)
            out.append(event)
        else:
            outcome = state.apply_load(record, event, classify, window_ms)
        out.extend(outcome.opens)
        if outcome.state is not None:
            out.append(outcome.state)
    return out + list(workload.engagements)


def load_events(engine: Engine, events: Iterable[Event], batch: int = 5000) -> None:
    """Through the loader's write path, in batches as the loader would."""
    pending = list(events)
    for i in range(0, len(pending), batch):
        write_batch(engine, rows_by_table((e.topic, e.to_bytes()) for e in pending[i:i + batch]))


# --- the truth per group -------------------------------------------------------------------
@dataclass
class EmailTruth:
    send: SendRegistered
    open_count: int = 0
    human_open_count: int = 0
    first_human_at: int | None = None
    last_human_at: int | None = None
    replied: bool = False
    unsubscribed: bool = False
    human_open_times: tuple[int, ...] = ()
    machine_open_times: tuple[int, ...] = ()


def email_truth(workload: Workload, window_ms: int = WINDOW_MS) -> dict[str, EmailTruth]:
    by_email = workload.loads_by_email()
    truth = {s.email_id: EmailTruth(s) for s in workload.sends}
    for email_id, t in truth.items():
        loads = by_email.get(email_id, []) if t.send.tracking else []  # no pixel, no opens
        verdicts = counted_verdicts((load.raw for load in loads), window_ms)
        counted = sorted((load.raw.received_at, load.true_class) for load in loads
                         if verdicts[load.raw.event_id])
        human = [at for at, cls in counted if cls != "machine"]
        t.open_count, t.human_open_count = len(counted), len(human)
        t.first_human_at = human[0] if human else None
        t.last_human_at = human[-1] if human else None
        t.human_open_times = tuple(human)
        t.machine_open_times = tuple(at for at, cls in counted if cls == "machine")
    for e in workload.engagements:
        if e.kind == "reply":
            truth[e.email_id].replied = True
        else:
            truth[e.email_id].unsubscribed = True
    return truth


def exact_quantile(values: list[int], level: float) -> int:
    """ClickHouse's quantileExact: the element at floor(level·n) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(level * len(ordered)))]


def group_truth(
    truth: dict[str, EmailTruth], key: Callable[[SendRegistered], str | None]
) -> dict[str, dict[str, Any]]:
    """Every count the comparison shows, per group (sends whose key is None are left out)."""
    groups: dict[str, list[EmailTruth]] = defaultdict(list)
    for t in truth.values():
        k = key(t.send)
        if k is not None:
            groups[k].append(t)
    out = {}
    for k, members in groups.items():
        waits = [t.first_human_at - t.send.sent_at for t in members if t.first_human_at]
        out[k] = {
            "sent": len(members),
            "tracked": sum(t.send.tracking for t in members),
            "opened": sum(t.open_count > 0 for t in members),
            "human_opened": sum(t.human_open_count > 0 for t in members),
            "total_opens": sum(t.open_count for t in members),
            "human_opens": sum(t.human_open_count for t in members),
            "replies": sum(t.replied for t in members),
            "unsubscribes": sum(t.unsubscribed for t in members),
            "median_ms": exact_quantile(waits, 0.5) if waits else None,
            "p90_ms": exact_quantile(waits, 0.9) if waits else None,
        }
    return out


KEYS: dict[str, Callable[[SendRegistered], str | None]] = {
    "template": lambda s: s.template_id,
    "subject": lambda s: s.subject,
    "sequence": lambda s: s.sequence_id,
    "sequence_step": lambda s: f"{s.sequence_id}/{s.sequence_step}" if s.sequence_id else None,
}


# --- a hand-made data set whose every number the tests write out ------------------------
class Exact:
    """A (40 sends, step 1), B (40 tracked + 2 untracked, step 2) of one sequence, and C
    (10 sends, a contact's, no sequence, a day later): every open, reply and revision known."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.events: list = []
        self.opens: dict[str, list[ProcessedOpen]] = {}

    def id(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def send(self, template: str, i: int, **kw) -> str:
        email_id = self.id(f"{template}{i}")
        fields = dict(
            profile_id=self.id("p1"), person_type="candidate", person_id=self.id(f"c{i}"),
            template_id=self.id(template), subject=self.id(template.lower()), sent_at=T0,
            sequence_id=None, sequence_step=None, registered_at=T0,
        )
        fields.update(kw)
        self.events.append(SendRegistered(email_id=email_id, **fields))
        return email_id

    def open(self, email_id: str, at: int, cls: str = "human", counted: bool = True,
             revision: int = 1, name: str | None = None) -> None:
        event = ProcessedOpen(name or f"{email_id}-{at}", email_id, at, cls, "", counted,
                              f"fp-{cls}", revision=revision)
        self.events.append(event)
        self.opens.setdefault(email_id, []).append(event)

    def engage(self, email_id: str, kind: str, n: int = 1) -> None:
        self.events += [Engagement(f"{email_id}-{kind}-{k}", email_id, kind, T0 + DAY)
                        for k in range(n)]

    def states(self) -> list[EmailState]:
        """The per-email state the worker would have written (newest revision of each open)."""
        out = []
        for email_id, events in self.opens.items():
            newest = {}
            for e in sorted(events, key=lambda e: e.revision):
                newest[e.event_id] = e
            counted = sorted((e for e in newest.values() if e.counted),
                             key=lambda e: e.received_at)
            human = [e for e in counted if e.load_class != "machine"]
            out.append(EmailState(
                email_id, opened=bool(counted), open_count=len(counted),
                human_open_count=len(human), machine_open_count=len(counted) - len(human),
                raw_load_count=len(newest),
                first_opened_at=counted[0].received_at if counted else None,
                last_opened_at=counted[-1].received_at if counted else None,
                last_human_opened_at=human[-1].received_at if human else None, revision=1,
                first_human_opened_at=human[0].received_at if human else None,
            ))
        return out


def build_exact(tag: str) -> Exact:
    x = Exact(tag)
    seq = x.id("S")
    for i in range(40):
        subject = x.id("hello" if i % 2 == 0 else "hi")
        a = x.send("A", i, subject=subject, sequence_id=seq, sequence_step=1)
        if i < 20:
            x.open(a, T0 + (i + 1) * MIN)
        if i in range(20, 25):
            x.open(a, T0 + 5_000, cls="machine")  # machine-only opened
    x.send("A", 0, subject=x.id("hello"), sequence_id=seq, sequence_step=1,
           registered_at=T0 + 1)  # registered again: still one send
    a = x.id
    x.open(a("A0"), T0 + HOUR)
    x.open(a("A0"), T0 + 2 * HOUR)
    x.open(a("A0"), T0 + 2 * HOUR + 5_000, counted=False)  # a repeated load
    x.open(a("A1"), T0 + 3 * HOUR, revision=1, counted=True, name="flip")
    x.open(a("A1"), T0 + 3 * HOUR, revision=2, counted=False, name="flip")  # re-decided
    x.open(a("A2"), T0 + 5_000, cls="machine")  # a scanner before the person
    x.open(a("A4"), T0 + 6 * HOUR, cls="proxy")  # a person again, through a proxy
    x.engage(a("A0"), "reply", n=2)
    x.engage(a("A5"), "reply")
    x.engage(a("A3"), "unsubscribe")
    for i in range(42):
        b = x.send("B", i, sequence_id=seq, sequence_step=2, tracking=i < 40)
        if i < 6:
            x.open(b, T0 + (i + 1) * 10 * MIN)
    x.engage(a("B0"), "reply")
    x.engage(a("B10"), "unsubscribe")
    x.engage(a("B11"), "unsubscribe")
    for i in range(10):
        c = x.send("C", i, sent_at=T0 + DAY, person_type="contact", profile_id=x.id("p2"))
        if i < 3:
            x.open(c, T0 + 2 * DAY)
    x.events += x.states()
    return x


# --- an app with the analytics blueprints, over a given engine -----------------------------
def make_app(engine: Engine | None, data_dir: Path, **env: str) -> Flask:
    """The real web app (``create_app``) with the two blueprints registered (unless
    ``opentrack.web`` already does), reading from ``engine`` - or, when None, from the
    warehouse its settings (``env``) name, as in production."""
    from dashboards import api, pages
    from opentrack.web import create_app

    settings = Settings.from_env({
        "OPENTRACK_DATA_DIR": str(data_dir), "OPENTRACK_API_KEY": API_KEY,
        "OPENTRACK_SECRET": SECRET, "OPENTRACK_KAFKA_BOOTSTRAP": "127.0.0.1:1", **env,
    })
    app = create_app(settings, eager=False)
    if engine is not None:
        app.extensions["opentrack.warehouse"] = lambda: engine
    for blueprint in (api.bp, pages.bp):
        if blueprint.name not in app.blueprints:
            app.register_blueprint(blueprint)
    return app


# --- self-checks of the helpers -----------------------------------------------------------
def test_tagging_keeps_the_workload_and_makes_ids_unique() -> None:
    a, b = make_workload("t1", emails=200), make_workload("t2", emails=200)
    assert len(a.sends) == len(b.sends) == 200
    assert not {s.email_id for s in a.sends} & {s.email_id for s in b.sends}
    assert {s.template_id.split("-", 1)[1] for s in a.sends} == {
        s.template_id.split("-", 1)[1] for s in b.sends}


def test_pipeline_states_equal_the_truth() -> None:
    """The worker's code with true classes gives the truth's counters (else the expected
    numbers of the analytics tests would be wrong, not the analytics)."""
    workload = make_workload(new_tag(), emails=500, untracked_every=20)
    truth = email_truth(workload)
    last_state = {e.email_id: e for e in pipeline_events(workload)
                  if isinstance(e, EmailState)}
    for email_id, t in truth.items():
        s = last_state[email_id]
        assert (s.open_count, s.human_open_count) == (t.open_count, t.human_open_count)
        assert (s.last_human_opened_at or None) == t.last_human_at
        assert (s.first_human_opened_at or None) == t.first_human_at
    assert any(isinstance(e, Engagement) for e in pipeline_events(workload))

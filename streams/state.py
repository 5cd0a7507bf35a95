"""Per-email stream state: replay drop, event-time dedup and the open counters, as pure code.

The worker keeps one ``EmailRecord`` per email in a changelogged table and calls
``apply_send`` / ``apply_load`` for each event. Everything here is a function of the events
(their own times, never the processing clock), so processing the same events again, in any
order and any number of times, gives the same state.

Dedup: the loads of one client (fingerprint) are sorted by time, and a load is counted when
it comes at least ``window`` after that client's previous counted load. Because the verdicts
are recomputed from the sorted loads, a late load that lands between two others gives the
same answer as if it had come in order; loads whose verdict it changed are emitted again.

State per email is bounded: the newest ``MAX_LOADS`` loads are kept in full (about 120 bytes
each); older ones are folded into running totals and a list of their short event ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentrack.events import EmailState, ProcessedOpen, RawOpen, SendRegistered

MAX_LOADS = 1000
MAX_PENDING = 200
_SHORT_ID = 16  # hex chars of an event id kept for loads folded out of the window


@dataclass(slots=True)
class Verdict:
    load_class: str
    reason: str = ""
    client_family: str = ""
    os_family: str = ""
    device_family: str = ""

    @property
    def is_machine(self) -> bool:
        return self.load_class == "machine"


Classifier = Callable[[RawOpen, int | None], Verdict]
TrackingAt = Callable[[str | None, int], bool]  # (profile_id, event time) → tracking on?


def always_tracked(profile_id: str | None, at_ms: int) -> bool:
    return True


def everyone_human(load: RawOpen, sent_at: int | None) -> Verdict:
    return Verdict("human")


@dataclass(slots=True)
class Load:
    """A load kept in the state, with what is needed to emit it again."""

    received_at: int
    event_id: str
    fingerprint: str
    load_class: str
    reason: str
    client_family: str
    os_family: str
    device_family: str
    counted: bool = False
    revision: int = 0  # of its newest verdict: the revision of the change that made it
    applied: int = 0  # the revision its own arrival made (0: kept before this was stored)

    def to_list(self) -> list[Any]:
        return [
            self.received_at, self.event_id, self.fingerprint, self.load_class, self.reason,
            self.client_family, self.os_family, self.device_family, self.counted, self.revision,
            self.applied,
        ]

    @property
    def sort_key(self) -> tuple[int, str]:
        return (self.received_at, self.event_id)

    def processed(self, email_id: str) -> ProcessedOpen:
        return ProcessedOpen(
            event_id=self.event_id, email_id=email_id, received_at=self.received_at,
            load_class=self.load_class, reason=self.reason, counted=self.counted,
            fingerprint=self.fingerprint, client_family=self.client_family,
            os_family=self.os_family, device_family=self.device_family, revision=self.revision,
        )


@dataclass(slots=True)
class Folded:
    """Totals of the loads folded out of the kept window (oldest first)."""

    open_count: int = 0
    human_open_count: int = 0
    raw_load_count: int = 0
    first_opened_at: int | None = None
    last_opened_at: int | None = None
    last_human_opened_at: int | None = None
    last_counted: dict[str, int] = field(default_factory=dict)  # fingerprint → time
    event_ids: list[str] = field(default_factory=list)  # short ids, to drop their replays
    first_human_opened_at: int | None = None


@dataclass(slots=True)
class EmailRecord:
    email_id: str
    sent_at: int | None = None
    profile_id: str | None = None
    tracking: bool = True
    erased: bool = False  # the person was erased: nothing is kept, later loads are dropped
    loads: list[Load] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    folded: Folded = field(default_factory=Folded)
    state: EmailState | None = None

    # -- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.erased:
            return {"erased": True}
        f = self.folded
        return {
            "sent_at": self.sent_at,
            "profile_id": self.profile_id,
            "tracking": self.tracking,
            "loads": [load.to_list() for load in self.loads],
            "pending": self.pending,
            "folded": [f.open_count, f.human_open_count, f.raw_load_count, f.first_opened_at,
                       f.last_opened_at, f.last_human_opened_at, f.last_counted, f.event_ids,
                       f.first_human_opened_at],
            "state": self.state.to_dict() if self.state else None,
        }

    @classmethod
    def from_dict(cls, email_id: str, data: dict[str, Any] | None) -> EmailRecord:
        if not data:
            return cls(email_id)
        if data.get("erased"):
            return cls(email_id, erased=True)
        return cls(
            email_id=email_id,
            sent_at=data.get("sent_at"),
            profile_id=data.get("profile_id"),
            tracking=data.get("tracking", True),
            loads=[Load(*row) for row in data.get("loads", [])],
            pending=data.get("pending", []),
            folded=Folded(*data["folded"]) if data.get("folded") else Folded(),
            state=EmailState.from_dict(data["state"]) if data.get("state") else None,
        )

    @property
    def send_known(self) -> bool:
        return self.sent_at is not None

    def kept(self, event_id: str) -> Load | None:
        return next((load for load in self.loads if load.event_id == event_id), None)

    def has_seen(self, event_id: str) -> bool:
        if self.kept(event_id) is not None:
            return True
        if any(p.get("event_id") == event_id for p in self.pending):
            return True
        return event_id[:_SHORT_ID] in self.folded.event_ids


@dataclass(slots=True)
class Outcome:
    """What one event changed: opens to emit (new or re-decided) and the new state, if any."""

    opens: list[ProcessedOpen] = field(default_factory=list)
    state: EmailState | None = None
    replay: bool = False
    parked: bool = False
    tracking_off: int = 0  # loads dropped because tracking was off for the email's profile
    reclassified: int = 0  # known loads whose class a replay with the current rules changed


def erase(email_id: str) -> EmailRecord:
    """What is left of an erased email: the fact, nothing of its person or loads."""
    return EmailRecord(email_id, erased=True)


def apply_send(
    record: EmailRecord,
    send: SendRegistered,
    classify: Classifier,
    window_ms: int,
    tracked: TrackingAt = always_tracked,
) -> Outcome:
    """Learn the send; loads that arrived before it are processed now, in time order."""
    if record.erased:
        return Outcome(replay=True)
    if record.send_known:  # the same send again changes nothing, but says it again
        return _said_again(record, record.loads)
    record.sent_at = send.sent_at
    record.profile_id = send.profile_id
    record.tracking = send.tracking
    pending, record.pending = record.pending, []
    outcome = Outcome()
    for raw in sorted(pending, key=lambda p: (p["received_at"], p["event_id"])):
        step = apply_load(record, RawOpen.from_dict(raw), classify, window_ms, tracked)
        outcome.tracking_off += step.tracking_off
        outcome.opens.extend(step.opens)
        outcome.state = step.state or outcome.state
    if outcome.state is None and record.state is None:
        outcome.state = _publish_state(record, _compute_state(record))
    return outcome


def apply_load(
    record: EmailRecord,
    raw: RawOpen,
    classify: Classifier,
    window_ms: int,
    tracked: TrackingAt = always_tracked,
) -> Outcome:
    if record.erased:
        return Outcome(replay=True)
    if record.has_seen(raw.event_id):  # a redelivery: what it made may not be out yet
        return _said_again(record, _made_by(record, raw.event_id))
    if not record.send_known:
        if len(record.pending) < MAX_PENDING:
            record.pending.append(raw.to_dict())
        return Outcome(parked=True)
    if not record.tracking or not tracked(record.profile_id, raw.received_at):
        return Outcome(tracking_off=1)
    verdict = classify(raw, record.sent_at)
    new = Load(
        received_at=raw.received_at, event_id=raw.event_id,
        fingerprint=client_fingerprint(raw.user_agent, raw.client),
        load_class=verdict.load_class, reason=verdict.reason,
        client_family=verdict.client_family, os_family=verdict.os_family,
        device_family=verdict.device_family,
    )
    record.loads.append(new)
    record.loads.sort(key=lambda load: load.sort_key)
    revision = (record.state.revision if record.state else 0) + 1
    changed = _decide_counted(record, window_ms)
    for load in changed:
        load.revision = revision
    new.revision = new.applied = revision
    _fold_oldest(record)
    outcome = Outcome(opens=[load.processed(record.email_id) for load in changed])
    if new not in changed:
        outcome.opens.append(new.processed(record.email_id))
    outcome.state = _publish_state(record, _compute_state(record))
    return outcome


def replay_load(
    record: EmailRecord,
    raw: RawOpen,
    classify: Classifier,
    window_ms: int,
    tracked: TrackingAt = always_tracked,
    *,
    reclassify: bool = False,
    emit: bool = False,
) -> Outcome:
    """A load re-sent by ``opentrack replay``. Unknown to the state: applied as usual (a
    rebuild). Known: with ``reclassify``, the current rules decide its class again and the
    state changes only if the verdict does; with ``emit``, the load and the state are emitted
    again as they are (a warehouse backfill), which the warehouse de-duplicates."""
    load = record.kept(raw.event_id)
    if load is None:
        if record.has_seen(raw.event_id):  # folded (or parked): only the state
            return Outcome(state=record.state, replay=True)
        return apply_load(record, raw, classify, window_ms, tracked)
    outcome = Outcome(replay=True)
    if reclassify:
        verdict = classify(raw, record.sent_at)
        if (verdict.load_class, verdict.reason) != (load.load_class, load.reason):
            load.load_class, load.reason = verdict.load_class, verdict.reason
            load.client_family = verdict.client_family
            load.os_family, load.device_family = verdict.os_family, verdict.device_family
            state = _publish_state(record, _compute_state(record))
            load.revision = record.state.revision if record.state else load.revision
            outcome = Outcome(opens=[load.processed(record.email_id)], state=state,
                              reclassified=1)
    if emit and not outcome.opens:
        outcome.opens = [load.processed(record.email_id)]
        outcome.state = outcome.state or record.state
    return outcome


def _made_by(record: EmailRecord, event_id: str) -> list[Load]:
    """The kept loads whose newest verdict a load's arrival made: the load itself and those
    it re-decided (a late load makes a later one a repeat), unless a later event changed
    them again, which then says them again itself when it is redelivered: every event after
    an uncommitted one is uncommitted too (one email, one partition)."""
    own = record.kept(event_id)
    if own is None:  # folded out of the kept window: only the state
        return []
    if not own.applied:  # stored before loads kept the revision of their arrival
        return [own]
    return [load for load in record.loads if load is own or load.revision == own.applied]


def _said_again(record: EmailRecord, loads: list[Load]) -> Outcome:
    """A replay changes nothing, but what the event made is emitted again as it is now.

    A worker killed after its table's changelog was written but before its outputs were
    published would otherwise recognise the re-delivered event as a replay and never send
    them: the warehouse would keep a stale state, or a load counted that a late load had
    made a repeat (seen after a SIGKILL). The outputs carry the current revisions, so the
    warehouse collapses the copies it already has.
    """
    if record.state is None:
        return Outcome(replay=True)
    return Outcome(opens=[load.processed(record.email_id) for load in loads],
                   state=record.state, replay=True)


def client_fingerprint(user_agent: str, client: str) -> str:
    """Same client = same user agent and same anonymised network; hashed to keep state small."""
    return hashlib.blake2b(f"{user_agent}\x00{client}".encode(), digest_size=8).hexdigest()


def _decide_counted(record: EmailRecord, window_ms: int) -> list[Load]:
    """Recompute every kept load's dedup verdict; return the loads whose verdict changed."""
    last = dict(record.folded.last_counted)
    changed = []
    for load in record.loads:
        previous = last.get(load.fingerprint)
        counted = previous is None or abs(load.received_at - previous) >= window_ms
        if counted:
            last[load.fingerprint] = load.received_at
        if counted != load.counted:
            load.counted = counted
            changed.append(load)
    return changed


def _fold_oldest(record: EmailRecord) -> None:
    f = record.folded
    while len(record.loads) > MAX_LOADS:
        load = record.loads.pop(0)
        f.raw_load_count += 1
        f.event_ids.append(load.event_id[:_SHORT_ID])
        if not load.counted:
            continue
        f.open_count += 1
        f.last_counted[load.fingerprint] = load.received_at
        f.first_opened_at = f.first_opened_at or load.received_at
        f.last_opened_at = load.received_at
        if load.load_class != "machine":
            f.human_open_count += 1
            f.first_human_opened_at = f.first_human_opened_at or load.received_at
            f.last_human_opened_at = load.received_at


def _compute_state(record: EmailRecord) -> EmailState:
    f = record.folded
    counted = [load for load in record.loads if load.counted]
    human = [load for load in counted if load.load_class != "machine"]
    open_count = f.open_count + len(counted)
    human_count = f.human_open_count + len(human)
    return EmailState(
        email_id=record.email_id,
        opened=open_count > 0,
        open_count=open_count,
        human_open_count=human_count,
        machine_open_count=open_count - human_count,
        raw_load_count=f.raw_load_count + len(record.loads),
        first_opened_at=f.first_opened_at or (counted[0].received_at if counted else None),
        last_opened_at=counted[-1].received_at if counted else f.last_opened_at,
        last_human_opened_at=human[-1].received_at if human else f.last_human_opened_at,
        first_human_opened_at=f.first_human_opened_at or (
            human[0].received_at if human else None),
    )


def _publish_state(record: EmailRecord, state: EmailState) -> EmailState | None:
    """Keep the new state; return it only if it differs, with the next revision."""
    previous = record.state
    if previous is not None:
        state.revision = previous.revision
        if state == previous:
            return None
    state.revision = (previous.revision if previous else 0) + 1
    record.state = state
    return state

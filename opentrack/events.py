"""The event contract between stages: one definition of each event and its topic.

Every event is JSON on the wire, keyed by the id that partitions it (``email_id`` for all
but profile settings). Times are integer epoch milliseconds, UTC. Stages import this
module and never each other, so this file is the written contract between them.
"""

from __future__ import annotations

import copy
import functools
import json
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

TOPIC_SENDS = "emails.sent"
TOPIC_OPENS_RAW = "opens.raw"
TOPIC_OPENS_PROCESSED = "opens.processed"
TOPIC_ENGAGEMENT = "engagement.raw"
TOPIC_EMAIL_STATE = "email_state"
TOPIC_PROFILES = "profiles.settings"
TOPIC_ERASURES = "erasures"
TOPIC_OPENS_REPLAY = "opens.replay"

PERSON_TYPES = ("candidate", "contact")
LOAD_CLASSES = ("human", "proxy", "machine")
ENGAGEMENT_KINDS = ("reply", "unsubscribe")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_event_id() -> str:
    return uuid.uuid4().hex


_ALLOWED: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "dict[str, str]": (dict,),
    "list[str]": (list,),
    "dict[str, Any]": (dict,),
}


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, tuple[type, ...], bool], ...]:
    """(name, allowed types, holds a dict or list) of each field, worked out once a class."""
    layout = []
    for f in fields(cls):
        allowed = _ALLOWED[str(f.type)]
        layout.append((f.name, allowed, allowed[0] in (dict, list)))
    return tuple(layout)


class Event:
    """JSON (de)serialisation shared by all events; unknown fields are ignored on read
    so that a newer producer does not break an older consumer."""

    topic: ClassVar[str]

    @property
    def key(self) -> str:
        return self.email_id  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: its recursive deep copy was most of the worker's time
        out = {}
        for name, _, mutable in _field_types(type(self)):
            value = getattr(self, name)
            out[name] = copy.copy(value) if mutable and value is not None else value
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build the event, refusing values of the wrong type: a malformed message must be
        rejected at the door of a stage, not fail later half-way into a table."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object")
        values = {}
        for name, allowed, _ in _field_types(cls):
            if name not in data:
                continue
            value = data[name]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                kinds = " or ".join(t.__name__ for t in allowed)
                raise ValueError(f"{cls.__name__}.{name}: {value!r} is not {kinds}")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        return cls.from_dict(json.loads(raw))


@dataclass(slots=True)
class SendRegistered(Event):
    """The CRM sent an email with (or without) a pixel."""

    topic: ClassVar[str] = TOPIC_SENDS
    email_id: str
    profile_id: str
    person_type: str
    person_id: str
    template_id: str
    subject: str
    sent_at: int
    sequence_id: str | None = None
    sequence_step: int | None = None
    tracking: bool = True
    registered_at: int = field(default_factory=now_ms)


@dataclass(slots=True)
class RawOpen(Event):
    """One pixel load as the edge saw it; the raw IP never gets here, only ``client``,
    an anonymised network prefix (IPv4 /24, IPv6 /48)."""

    topic: ClassVar[str] = TOPIC_OPENS_RAW
    event_id: str
    email_id: str
    received_at: int
    user_agent: str
    client: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ProcessedOpen(Event):
    """A raw open after replay drop, classification and dedup.

    ``counted`` is the dedup verdict (False: a repeated image load). A late, out-of-order
    load can change the verdict of a load already emitted; the processor then emits that
    load again with a higher ``revision``, and the warehouse keeps the highest.
    """

    topic: ClassVar[str] = TOPIC_OPENS_PROCESSED
    event_id: str
    email_id: str
    received_at: int
    load_class: str
    reason: str
    counted: bool
    fingerprint: str
    client_family: str = ""
    os_family: str = ""
    device_family: str = ""
    revision: int = 0


@dataclass(slots=True)
class EmailState(Event):
    """The per-email open state the CRM reads (DESIGN.md, "Per-email open state").

    ``revision`` grows by one each time the state changes, so that a sink can keep the
    newest and drop re-deliveries of older ones.
    """

    topic: ClassVar[str] = TOPIC_EMAIL_STATE
    email_id: str
    opened: bool = False
    open_count: int = 0
    human_open_count: int = 0
    machine_open_count: int = 0
    raw_load_count: int = 0
    first_opened_at: int | None = None
    last_opened_at: int | None = None
    last_human_opened_at: int | None = None
    revision: int = 0
    # the first counted human (or proxy) open: time to first human open, per template etc.
    first_human_opened_at: int | None = None


@dataclass(slots=True)
class Engagement(Event):
    """A reply or an unsubscribe the CRM reported for a send."""

    topic: ClassVar[str] = TOPIC_ENGAGEMENT
    event_id: str
    email_id: str
    kind: str
    at: int


@dataclass(slots=True)
class ProfileTracking(Event):
    """Tracking switched on or off for a sender profile (compacted topic, last one wins)."""

    topic: ClassVar[str] = TOPIC_PROFILES
    profile_id: str
    enabled: bool
    at: int

    @property
    def key(self) -> str:
        return self.profile_id


@dataclass(slots=True)
class Erasure(Event):
    """A person's data is to be erased: their sends and everything derived from them.

    The worker forgets the emails' state (keeping only that they were erased, so late loads
    are dropped) when it sees the sends' tombstones on ``emails.sent``; the loader deletes
    the rows and refuses any that arrive later for these emails.
    """

    topic: ClassVar[str] = TOPIC_ERASURES
    event_id: str
    person_type: str
    person_id: str
    email_ids: list[str]
    at: int

    @property
    def key(self) -> str:
        return f"{self.person_type}:{self.person_id}"


@dataclass(slots=True)
class ReplayedOpen(Event):
    """A raw open sent again by ``opentrack replay``, for the worker that owns its email:
    ``reclassify`` asks it to apply the current rules, ``emit`` to emit the load and the
    state again for the warehouse. Kept apart from ``opens.raw``, which stays the record of
    what really happened."""

    topic: ClassVar[str] = TOPIC_OPENS_REPLAY
    replay_id: str
    email_id: str
    raw: dict[str, Any]
    reclassify: bool = False
    emit: bool = False


ALL_TOPICS = (
    TOPIC_SENDS,
    TOPIC_OPENS_RAW,
    TOPIC_OPENS_PROCESSED,
    TOPIC_ENGAGEMENT,
    TOPIC_EMAIL_STATE,
    TOPIC_PROFILES,
    TOPIC_ERASURES,
    TOPIC_OPENS_REPLAY,
)

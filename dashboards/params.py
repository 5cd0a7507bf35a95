"""Parameters of the analytics reads, parsed once for the API, the pages and notebooks.

Every bad value raises ``BadParameter`` naming the field, so the API answers a 400 that says
what is wrong and the pages show the same sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from opentrack.events import PERSON_TYPES

GROUPINGS = ("template", "subject", "sequence", "sequence_step")
METRICS = ("human_open_rate", "open_rate", "reply_rate", "unsubscribe_rate")
SORTS = ("recent", "reopened")
FORMATS = ("json", "csv")
MAX_LIMIT = 1000
MAX_ID = 256  # longer values are no id of ours; refuse them early
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class BadParameter(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Filters:
    """Which sends an analysis covers: ``start`` <= sent_at < ``end`` (epoch ms) and the rest."""

    start: int | None = None
    end: int | None = None
    profile_id: str | None = None
    person_type: str | None = None
    template_ids: tuple[str, ...] = ()
    sequence_ids: tuple[str, ...] = ()


def values(args: Mapping[str, Any], name: str) -> list[str]:
    """All non-empty values of a parameter, from a Flask MultiDict or a plain dict."""
    raw = args.getlist(name) if hasattr(args, "getlist") else args.get(name)
    if raw is None:
        return []
    items = raw if isinstance(raw, list | tuple) else [raw]
    return [str(item).strip() for item in items if str(item).strip()]


def one(args: Mapping[str, Any], name: str) -> str | None:
    found = values(args, name)
    if len(found) > 1:
        raise BadParameter(name, f"{name} given {len(found)} times; give it once")
    return found[0] if found else None


def parse_time(value: str | int | None, name: str, end_of_day: bool = False) -> int | None:
    """Epoch ms, or ISO 8601 (a zone-less time is UTC). A bare date is its midnight UTC, or
    with ``end_of_day`` the next midnight, so that ``to=2026-01-31`` includes the 31st."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if text.isdigit():
        if int(text) > MAX_MS:
            raise BadParameter(name, f"{name}={text}: epoch milliseconds beyond the year 9999")
        return int(text)
    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if end_of_day else 0)
            return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadParameter(
            name, f"{name}={text!r} is not a time: use ISO 8601 (2026-01-05 or "
            "2026-01-05T09:00:00Z) or epoch milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _ids(args: Mapping[str, Any], name: str) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(values(args, name)))
    for item in found:
        if len(item) > MAX_ID:
            raise BadParameter(name, f"{name} longer than {MAX_ID} characters")
    return found


def parse_filters(args: Mapping[str, Any]) -> Filters:
    start = parse_time(one(args, "from"), "from")
    end = parse_time(one(args, "to"), "to", end_of_day=True)
    if start is not None and end is not None and start >= end:
        raise BadParameter("to", "to must be after from")
    person_type = one(args, "person_type")
    if person_type is not None and person_type not in PERSON_TYPES:
        raise BadParameter("person_type", f"person_type must be one of {', '.join(PERSON_TYPES)}")
    profile_id = one(args, "profile_id")
    if profile_id is not None and len(profile_id) > MAX_ID:
        raise BadParameter("profile_id", f"profile_id longer than {MAX_ID} characters")
    return Filters(
        start=start, end=end, profile_id=profile_id, person_type=person_type,
        template_ids=_ids(args, "template_id"), sequence_ids=_ids(args, "sequence_id"),
    )


def check(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BadParameter(name, f"{name}={value!r}: must be one of {', '.join(allowed)}")
    return value


def choice(args: Mapping[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    return check(name, one(args, name) or default, allowed)


def integer(args: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    raw = one(args, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(name, f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise BadParameter(name, f"{name} must be between {low} and {high}")
    return value


def timezone(args: Mapping[str, Any]) -> str:
    name = one(args, "tz") or "UTC"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadParameter("tz", f"tz={name!r} is not an IANA time zone (e.g. Europe/Berlin)"
                           ) from None
    return name


FILTER_NAMES = frozenset({"from", "to", "profile_id", "person_type", "template_id", "sequence_id"})
COMPARE_NAMES = FILTER_NAMES | {"by", "baseline", "metric", "format"}
FOLLOW_UP_NAMES = FILTER_NAMES | {"sort", "limit", "offset", "format"}
TIMING_NAMES = FILTER_NAMES | {"tz", "format"}


def only_known(args: Mapping[str, Any], known: frozenset[str]) -> None:
    """Refuse a misspelt parameter rather than silently answer for every send."""
    for name in args:
        if name not in known:
            raise BadParameter(name, f"unknown parameter {name!r}; known: "
                               + ", ".join(sorted(known)))


@dataclass(frozen=True)
class CompareOptions:
    by: str
    filters: Filters
    baseline: str | None
    metric: str


def compare_options(args: Mapping[str, Any], by: str | None = None) -> CompareOptions:
    """The options of a comparison; ``by`` fixed by a page, else read from the request."""
    only_known(args, COMPARE_NAMES)
    return CompareOptions(
        by=by or choice(args, "by", GROUPINGS, "template"),
        filters=parse_filters(args),
        baseline=one(args, "baseline"),
        metric=choice(args, "metric", METRICS, "human_open_rate"),
    )


def output_format(args: Mapping[str, Any]) -> str:
    return choice(args, "format", FORMATS, "json")

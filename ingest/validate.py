"""Validation of the intake API's JSON bodies: the first bad field is named in the error."""

from __future__ import annotations

from typing import Any

from opentrack.events import PERSON_TYPES, SendRegistered
from opentrack.http import Invalid
from opentrack.times import parse_time
from opentrack.tokens import EMAIL_ID_PATTERN

__all__ = ["Invalid", "parse_time", "text", "email_id", "json_object", "send"]


def text(body: dict[str, Any], field: str, max_length: int = 128, required: bool = True) -> Any:
    value = body.get(field)
    if value is None:
        if required:
            raise Invalid(field, "is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise Invalid(field, "expected a non-empty string")
    if len(value) > max_length:
        raise Invalid(field, f"longer than {max_length} characters")
    return value


def email_id(value: Any, field: str = "email_id") -> str:
    if not isinstance(value, str) or not EMAIL_ID_PATTERN.match(value):
        raise Invalid(field, "expected 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return value


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Invalid("body", "expected a JSON object")
    return body


def send(body: Any) -> SendRegistered:
    body = json_object(body)
    person_type = body.get("person_type")
    if person_type not in PERSON_TYPES:
        raise Invalid("person_type", "expected 'candidate' or 'contact'")
    step = body.get("sequence_step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise Invalid("sequence_step", "expected a positive integer")
    sequence_id = text(body, "sequence_id", required=False)
    if step is not None and sequence_id is None:
        raise Invalid("sequence_id", "is required when sequence_step is given")
    return SendRegistered(
        email_id=email_id(body.get("email_id")),
        profile_id=text(body, "profile_id"),
        person_type=person_type,
        person_id=text(body, "person_id"),
        template_id=text(body, "template_id"),
        subject=text(body, "subject", max_length=998),
        sent_at=parse_time(body.get("sent_at"), "sent_at"),
        sequence_id=sequence_id,
        sequence_step=step,
    )

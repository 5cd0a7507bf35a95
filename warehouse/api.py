"""The CRM's read API over the warehouse: email detail, the Opened folder, a person's emails."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from opentrack.auth import require_api_key
from opentrack.events import PERSON_TYPES, TOPIC_SENDS, Erasure, new_event_id, now_ms
from opentrack.http import Invalid, json_error
from opentrack.times import parse_time
from opentrack.tokens import EMAIL_ID_PATTERN
from warehouse import erasure, reads
from warehouse.engines import Engine, WarehouseUnavailable

bp = Blueprint("crm", __name__)
MAX_LIMIT = 500
ERASURE_WAIT = 30.0


def engine() -> Engine:
    return current_app.extensions["opentrack.warehouse"]()


@bp.errorhandler(WarehouseUnavailable)
def unavailable(exc: WarehouseUnavailable) -> Response:
    response = json_error(503, "the warehouse is unavailable right now; retry shortly")
    response.headers["Retry-After"] = "2"
    return response


@bp.errorhandler(Invalid)
def invalid(exc: Invalid) -> Response:
    return json_error(400, exc.message, field=exc.field)


@bp.errorhandler(reads.BadCursor)
def bad_cursor(exc: reads.BadCursor) -> Response:
    return json_error(400, str(exc), field="cursor")


def _limit() -> int:
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise Invalid("limit", f"expected an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _time_arg(name: str) -> int | None:
    raw = request.args.get(name)
    return None if raw is None else parse_time(raw, name)


def _flag(name: str, default: bool) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return default
    if raw.lower() not in ("true", "false", "1", "0"):
        raise Invalid(name, "expected true or false")
    return raw.lower() in ("true", "1")


def _text_arg(name: str) -> str | None:
    raw = request.args.get(name)
    if raw is not None and not 1 <= len(raw) <= 128:
        raise Invalid(name, "expected 1-128 characters")
    return raw


@bp.get("/v1/emails/<email_id>/opens")
@require_api_key
def email_opens(email_id: str) -> Response:
    if not EMAIL_ID_PATTERN.match(email_id):
        raise Invalid("email_id", "expected 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    state = reads.email_opens(engine(), email_id)
    if state is None:
        return json_error(404, f"no email {email_id!r} was registered", field="email_id")
    return jsonify(state)


@bp.get("/v1/folders/opened")
@require_api_key
def opened_folder() -> Response:
    params: dict[str, Any] = dict(
        profile_id=_text_arg("profile_id"), since=_time_arg("since"), until=_time_arg("until"),
        human_only=_flag("human_only", True), limit=_limit(), cursor=request.args.get("cursor"),
    )
    return jsonify(reads.opened_folder(engine(), **params).to_dict())


@bp.get("/v1/people/<person_type>/<person_id>/emails")
@require_api_key
def person_emails(person_type: str, person_id: str) -> Response:
    if person_type not in PERSON_TYPES:
        raise Invalid("person_type", "expected 'candidate' or 'contact'")
    page = reads.person_emails(engine(), person_type, person_id, limit=_limit(),
                               cursor=request.args.get("cursor"))
    return jsonify(page.to_dict())


@bp.delete("/v1/people/<person_type>/<person_id>")
@require_api_key
def erase_person(person_type: str, person_id: str) -> tuple[Response, int]:
    """Erase a person: their sends, opens, states and engagement, in the warehouse and in the
    stream state. Applied by the loader and the worker; answers once it is done (200), or 202
    with what is still pending if that takes longer than ``ERASURE_WAIT``."""
    if person_type not in PERSON_TYPES:
        raise Invalid("person_type", "expected 'candidate' or 'contact'")
    warehouse = engine()
    email_ids = erasure.person_email_ids(warehouse, person_type, person_id)
    removed = erasure.row_counts(warehouse, email_ids)
    publisher = current_app.extensions["opentrack.publisher"]()
    for email_id in email_ids:
        publisher.publish_tombstone(TOPIC_SENDS, email_id)
    publisher.publish(Erasure(new_event_id(), person_type, person_id, email_ids, now_ms()))
    deadline = time.monotonic() + ERASURE_WAIT
    remaining = removed
    while any(remaining.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        remaining = erasure.row_counts(warehouse, email_ids)
    complete = not any(remaining.values())
    body = {"person_type": person_type, "person_id": person_id, "emails": email_ids,
            "removed_rows": removed, "complete": complete}
    if not complete:
        body["remaining_rows"] = remaining
    return jsonify(body), 200 if complete else 202

"""The intake API: the CRM registers sends and reports replies and unsubscribes."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from markupsafe import escape

from ingest import validate
from opentrack.auth import require_api_key
from opentrack.events import Engagement, ProfileTracking, SendRegistered, now_ms
from opentrack.http import json_error

bp = Blueprint("intake", __name__)
MAX_BATCH = 1000


def _body() -> Any:
    body = request.get_json(silent=True)
    if body is None:
        raise validate.Invalid("body", "expected a JSON body with Content-Type: application/json")
    return body


def _registration(send: SendRegistered) -> dict[str, Any]:
    settings = current_app.config["OPENTRACK"]
    token = current_app.extensions["opentrack.signer"].sign(send.email_id)
    url = f"{settings.public_url}/o/{token}.gif"
    return {
        "email_id": send.email_id,
        "tracking": send.tracking,
        "pixel_url": url if send.tracking else None,
        "pixel_html": (
            f'<img src="{escape(url)}" width="1" height="1" alt="" '
            'style="display:block;border:0;width:1px;height:1px" />'
        ) if send.tracking else None,
    }


def _with_tracking(send: SendRegistered) -> SendRegistered:
    """A send of a profile whose tracking is off is registered without a pixel."""
    send.tracking = current_app.extensions["opentrack.profiles"]().enabled_now(send.profile_id)
    return send


def _publish(*events: Any) -> None:
    publisher = current_app.extensions["opentrack.publisher"]()
    for event in events:
        publisher.publish(event)


@bp.errorhandler(validate.Invalid)
def invalid(exc: validate.Invalid) -> Response:
    return json_error(400, exc.message, field=exc.field)


@bp.post("/v1/emails")
@require_api_key
def register_send() -> tuple[Response, int]:
    send = _with_tracking(validate.send(_body()))
    _publish(send)
    return jsonify(_registration(send)), 201


@bp.post("/v1/emails/batch")
@require_api_key
def register_batch() -> tuple[Response, int] | Response:
    body = validate.json_object(_body())
    items = body.get("emails")
    if not isinstance(items, list) or not items:
        raise validate.Invalid("emails", "expected a non-empty list of sends")
    if len(items) > MAX_BATCH:
        raise validate.Invalid("emails", f"at most {MAX_BATCH} sends per batch")
    sends = []
    for i, item in enumerate(items):
        try:
            sends.append(_with_tracking(validate.send(item)))
        except validate.Invalid as exc:  # all or nothing: nothing is published
            raise validate.Invalid(f"emails[{i}].{exc.field}", exc.message) from None
    _publish(*sends)
    return jsonify({"emails": [_registration(s) for s in sends]}), 201


@bp.put("/v1/profiles/<profile_id>/tracking")
@require_api_key
def profile_tracking(profile_id: str) -> Response:
    validate.text({"profile_id": profile_id}, "profile_id")
    body = validate.json_object(_body())
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise validate.Invalid("enabled", "expected true or false")
    event = ProfileTracking(profile_id=profile_id, enabled=enabled, at=now_ms())
    _publish(event)
    current_app.extensions["opentrack.profiles"]().apply(event)
    return jsonify({"profile_id": profile_id, "enabled": enabled})


def _engagement(kind: str) -> tuple[Response, int]:
    body = validate.json_object(_body())
    email_id = validate.email_id(body.get("email_id"))
    at = validate.parse_time(body.get("at"), "at")
    # The same reply reported again (a CRM retry) is the same event: its id is derived.
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"opentrack:{kind}:{email_id}:{at}").hex
    event = Engagement(event_id=event_id, email_id=email_id, kind=kind, at=at)
    _publish(event)
    return jsonify({"email_id": event.email_id, "kind": kind, "accepted": True}), 202


@bp.post("/v1/events/replies")
@require_api_key
def reply() -> tuple[Response, int]:
    return _engagement("reply")


@bp.post("/v1/events/unsubscribes")
@require_api_key
def unsubscribe() -> tuple[Response, int]:
    return _engagement("unsubscribe")

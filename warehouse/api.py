"""The CRM's read API over the warehouse."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from opentrack.auth import require_api_key
from opentrack.http import json_error
from opentrack.tokens import EMAIL_ID_PATTERN
from warehouse import reads
from warehouse.engines import WarehouseUnavailable

bp = Blueprint("crm", __name__)


def engine():  # noqa: ANN201 - an Engine
    return current_app.extensions["opentrack.warehouse"]()


@bp.errorhandler(WarehouseUnavailable)
def unavailable(exc: WarehouseUnavailable) -> Response:
    response = json_error(503, "the warehouse is unavailable right now; retry shortly")
    response.headers["Retry-After"] = "2"
    return response


@bp.get("/v1/emails/<email_id>/opens")
@require_api_key
def email_opens(email_id: str) -> Response:
    if not EMAIL_ID_PATTERN.match(email_id):
        return json_error(400, "email_id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
                          field="email_id")
    state = reads.email_opens(engine(), email_id)
    if state is None:
        return json_error(404, f"no email {email_id!r} was registered", field="email_id")
    return jsonify(state)

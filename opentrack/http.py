"""Small shared pieces of the JSON API: errors that say what is wrong."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify


class Invalid(ValueError):
    """Bad input, with the field to name in the 400 answer."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def json_error(status: int, message: str, field: str | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    response = jsonify(body)
    response.status_code = status
    return response

"""Bearer API key on everything but the pixel and /healthz, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import current_app, request

from opentrack.http import json_error


def api_key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return json_error(
                401, "missing API key: send 'Authorization: Bearer <OPENTRACK_API_KEY>'"
            )
        if not api_key_matches(given.strip(), current_app.config["OPENTRACK"].api_key):
            return json_error(401, "invalid API key")
        return view(*args, **kwargs)

    return guarded

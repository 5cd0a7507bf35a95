"""GET|HEAD /o/<token>.gif: always the 1×1 GIF; an open is recorded only for a valid token.

The pixel is served as plain WSGI in front of Flask (``pixel_in_front``): Flask's request
context, routing and Response objects cost more than the rest of the pixel under
``opentrack web`` (bench/pixel: about 2x the requests/s). It also means every GET or HEAD
under /o gets the GIF whatever the path looks like (extra slashes, bytes a router would not
match), and whatever goes wrong while recording, the mail client still gets its image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

from ingest.metrics import PIXEL_LOADS
from ingest.privacy import anonymise, client_address
from opentrack.events import RawOpen, new_event_id, now_ms

log = logging.getLogger(__name__)

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_CACHE = {
    "Content-Type": "image/gif",
    "Cache-Control": "no-store, no-cache, must-revalidate, private",
    "Pragma": "no-cache",
    "Expires": "0",
    "Content-Length": str(len(GIF)),
}
# Request headers the classifier may use; everything else (cookies, forwarding) stays out.
KEPT_HEADERS = ("Accept", "Accept-Language", "Via", "From")
_KEPT_ENVIRON = tuple((h, "HTTP_" + h.upper().replace("-", "_")) for h in KEPT_HEADERS)
_GIF_HEADERS = list(NO_CACHE.items())
_MAX_HEADER = 256
_MAX_AGENT = 512

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def is_pixel_request(environ: dict[str, Any]) -> bool:
    if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        return False
    path = environ.get("PATH_INFO", "")
    return path == "/o" or path.startswith("/o/")


def record_load(app: Flask, environ: dict[str, Any]) -> None:
    """Publish the load if the token is ours; count the outcome either way."""
    rest = environ.get("PATH_INFO", "")[3:]
    token = rest[:-4] if rest.endswith(".gif") else None
    email_id = app.extensions["opentrack.signer"].verify(token) if token else None
    if email_id is None:
        PIXEL_LOADS.labels(outcome="invalid_token").inc()
        return
    settings = app.config["OPENTRACK"]
    address = client_address(
        environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), settings.proxy_hops
    )
    event = RawOpen(
        event_id=new_event_id(),
        email_id=email_id,
        received_at=now_ms(),
        user_agent=environ.get("HTTP_USER_AGENT", "")[:_MAX_AGENT],
        client=anonymise(address),
        headers={h: v[:_MAX_HEADER] for h, key in _KEPT_ENVIRON if (v := environ.get(key))},
    )
    app.extensions["opentrack.publisher"]().publish(event)
    PIXEL_LOADS.labels(outcome="counted").inc()


def pixel_in_front(app: Flask, flask_wsgi: WSGIApp) -> WSGIApp:
    """A WSGI app that answers the pixel itself and passes everything else to Flask."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not is_pixel_request(environ):
            return flask_wsgi(environ, start_response)
        try:
            record_load(app, environ)
        except Exception:
            log.exception("recording a pixel load failed; the GIF is sent anyway")
        start_response("200 OK", list(_GIF_HEADERS))
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [GIF]

    return wsgi

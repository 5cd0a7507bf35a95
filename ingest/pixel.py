"""GET|HEAD /o/<token>.gif: always the 1×1 GIF; an open is recorded only for a valid token."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from ingest.metrics import PIXEL_LOADS
from ingest.privacy import anonymise, client_address
from opentrack.events import RawOpen, new_event_id, now_ms

bp = Blueprint("pixel", __name__)

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
_MAX_HEADER = 256
_MAX_AGENT = 512


def gif() -> Response:
    return Response(GIF, status=200, headers=NO_CACHE)


@bp.before_app_request
def pixel_before_routing() -> Response | None:
    """Every GET or HEAD under /o gets the GIF, whatever the path looks like (extra slashes,
    bytes the router would not match): routing could only answer 404 there."""
    path = request.path
    if request.method in ("GET", "HEAD") and (path == "/o" or path.startswith("/o/")):
        return pixel(path[3:])
    return None


def pixel(rest: str) -> Response:
    token = rest[:-4] if rest.endswith(".gif") else None
    email_id = current_app.extensions["opentrack.signer"].verify(token) if token else None
    if email_id is None:
        PIXEL_LOADS.labels(outcome="invalid_token").inc()
        return gif()
    settings = current_app.config["OPENTRACK"]
    address = client_address(
        request.remote_addr, request.headers.get("X-Forwarded-For"), settings.proxy_hops
    )
    event = RawOpen(
        event_id=new_event_id(),
        email_id=email_id,
        received_at=now_ms(),
        user_agent=request.headers.get("User-Agent", "")[:_MAX_AGENT],
        client=anonymise(address),
        headers={h: v[:_MAX_HEADER] for h in KEPT_HEADERS if (v := request.headers.get(h))},
    )
    current_app.extensions["opentrack.publisher"]().publish(event)
    PIXEL_LOADS.labels(outcome="counted").inc()
    return gif()

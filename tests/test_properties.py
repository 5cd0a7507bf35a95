"""Property-based tests: whatever arrives, the pixel answers with the GIF and the API with
2xx or a 4xx JSON error, never a 5xx."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.pixel import GIF
from opentrack.web import create_app

PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
# The app's Kafka clients run threads that draw from the global random module (backoff
# jitter, node order: kafka-python's net manager, selector, cluster and sender, seen while
# these tests ran); when that happens while Hypothesis draws an example, it warns that a
# strategy used ``random``. None of these strategies does.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies")


@pytest.fixture(scope="module")
def client(running_stack):
    app = create_app(running_stack.settings)
    return app.test_client()


@pytest.fixture(scope="module")
def auth(running_stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {running_stack.settings.api_key}"}


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300)


@PROPS
@given(path=st.text(max_size=300), query=st.text(max_size=100), agent=header_text,
       forwarded=header_text, method=st.sampled_from(["GET", "HEAD"]))
def test_pixel_always_answers_the_gif(client, path, query, agent, forwarded, method) -> None:
    url = "/o/" + urllib.parse.quote(path, safe="/.") + "?" + urllib.parse.quote(query)
    response = client.open(url, method=method,
                           headers={"User-Agent": agent, "X-Forwarded-For": forwarded})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/gif"
    assert response.headers["Cache-Control"].startswith("no-store")
    if method == "GET":
        assert response.data == GIF


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                      children, max_size=6),
    max_leaves=20,
)
send_like = st.fixed_dictionaries({}, optional={
    "email_id": st.text(max_size=140) | json_values, "profile_id": st.text(max_size=140),
    "person_type": st.sampled_from(["candidate", "contact", "robot", ""]) | json_values,
    "person_id": st.text(max_size=10), "template_id": st.text(max_size=10),
    "subject": st.text(max_size=30), "sent_at": st.text(max_size=30) | json_values,
    "sequence_id": json_values, "sequence_step": json_values,
})


def assert_2xx_or_4xx_json(response) -> None:
    assert response.status_code < 500, response.data
    body = json.loads(response.data)
    if response.status_code >= 400:
        assert isinstance(body["error"], str) and body["error"]


@PROPS
@given(body=send_like | json_values)
def test_registration_never_5xx(client, auth, body) -> None:
    assert_2xx_or_4xx_json(client.post("/v1/emails", json=body, headers=auth))


@PROPS
@given(body=st.fixed_dictionaries({"emails": st.lists(send_like, max_size=3)}) | json_values)
def test_batch_never_5xx(client, auth, body) -> None:
    assert_2xx_or_4xx_json(client.post("/v1/emails/batch", json=body, headers=auth))


@PROPS
@given(body=st.fixed_dictionaries({}, optional={"email_id": st.text(max_size=20) | json_values,
                                                "at": st.text(max_size=30) | json_values})
       | json_values, kind=st.sampled_from(["replies", "unsubscribes"]))
def test_engagement_never_5xx(client, auth, body, kind) -> None:
    assert_2xx_or_4xx_json(client.post(f"/v1/events/{kind}", json=body, headers=auth))


@PROPS
@given(profile=st.text(min_size=1, max_size=150), body=json_values)
def test_profile_tracking_never_5xx(client, auth, profile, body) -> None:
    url = "/v1/profiles/" + urllib.parse.quote(profile, safe="") + "/tracking"
    assert_2xx_or_4xx_json(client.put(url, json=body, headers=auth))


@PROPS
@given(email_id=st.text(min_size=1, max_size=200), key=header_text)
def test_reads_never_5xx(client, auth, email_id, key) -> None:
    url = "/v1/emails/" + urllib.parse.quote(email_id, safe="") + "/opens"
    assert_2xx_or_4xx_json(client.get(url, headers=auth))
    # without the key: 401, or 404 where the id does not even make a route (a decoded "/")
    assert client.get(url, headers={"Authorization": key}).status_code in (401, 404)


@PROPS
@given(raw=st.binary(max_size=200))
def test_non_json_bodies_are_400(client, auth, raw) -> None:
    response = client.post("/v1/emails", data=raw, headers=auth, content_type="application/json")
    assert_2xx_or_4xx_json(response)


@pytest.mark.parametrize("path", [
    "//o//x.gif", "/o//x.gif", "/o/%00.gif", "/o/" + "a" * 6000 + ".gif", "/o/%FF%FE.gif",
    "/o/../o/x.gif", "/o", "/o/", "/o/x.gif?" + "q=1&" * 200, "/o/%ZZ.gif",
])
def test_odd_pixel_paths_through_the_real_server(running_stack, path) -> None:
    host, port = running_stack.settings.listen
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET " + path.encode("latin-1") + b" HTTP/1.1\r\nHost: x\r\n"
                     b"User-Agent: odd/1.0\r\nConnection: close\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    if path.startswith("/o"):
        assert response.status == 200 and body == GIF, path
    else:  # "//o//x.gif" is not under /o/: a clear 404, still no 5xx
        assert response.status < 500

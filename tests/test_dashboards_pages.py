"""The dashboards' pages through Flask's test client: login, each page, CSV, safety."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest

from opentrack.events import SendRegistered
from tests.test_analytics_world import (
    API_KEY,
    T0,
    build_exact,
    load_events,
    make_app,
    new_tag,
)

HOSTILE = '</script><script>alert("x")</script><img src=x onerror=alert(1)>'
PAGES = ("templates", "subjects", "sequences", "follow-ups", "timing")


@pytest.fixture(scope="module")
def site(warehouse_engine, tmp_path_factory) -> tuple:
    x = build_exact(new_tag("pg"))
    hostile = SendRegistered(x.id("X1"), x.id("p1"), "candidate", "c", x.id("A"), HOSTILE, T0,
                             registered_at=T0)
    load_events(warehouse_engine, [*x.events, hostile])
    app = make_app(warehouse_engine, tmp_path_factory.mktemp("pages"))
    query = "&".join(f"template_id={x.id(t)}" for t in "ABC")
    return app, x, query


def logged_in_client(app):
    client = app.test_client()
    response = client.post("/dashboards/login", data={"api_key": API_KEY})
    assert response.status_code == 302
    return client


def session_payload(cookie_value: str) -> dict:
    """Flask's session cookie: (".")base64(json or zlib(json)).timestamp.signature."""
    compressed = cookie_value.startswith(".")
    data = cookie_value.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    return json.loads(zlib.decompress(raw) if compressed else raw)


def test_pages_need_a_login(site) -> None:
    app, _, query = site
    client = app.test_client()
    for name in PAGES:
        response = client.get(f"/dashboards/{name}?{query}")
        assert response.status_code == 302
        target = urlsplit(response.headers["Location"])
        assert target.path == "/dashboards/login"
        assert parse_qs(target.query)["next"][0].startswith(f"/dashboards/{name}?")
    assert client.get("/dashboards/").headers["Location"].endswith("/dashboards/templates")


def test_login_form_cookie_and_logout(site) -> None:
    app, _, query = site
    client = app.test_client()
    form = client.get("/dashboards/login")
    assert form.status_code == 200
    assert b'method="post"' in form.data and b'type="password"' in form.data
    wrong = client.post("/dashboards/login", data={"api_key": "guess"})
    assert wrong.status_code == 401 and b"not the API key" in wrong.data
    assert client.get("/dashboards/templates").status_code == 302

    response = client.post("/dashboards/login",
                           data={"api_key": API_KEY, "next": f"/dashboards/timing?{query}"})
    assert response.status_code == 302
    assert response.headers["Location"] == f"/dashboards/timing?{query}"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("opentrack_session=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert API_KEY not in json.dumps(session_payload(value))  # a fingerprint, not the key
    assert client.get(f"/dashboards/templates?{query}").status_code == 200
    assert client.get("/dashboards/login").status_code == 302  # already in

    out = client.post("/dashboards/logout")
    assert out.status_code == 302 and out.headers["Location"].endswith("/dashboards/login")
    assert client.get("/dashboards/templates").status_code == 302
    assert client.get("/dashboards/logout").status_code in (404, 405)  # POST only


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x",
                                    "/dashboards/\\\\evil.example", "/v1/analytics/compare"])
def test_no_open_redirect(site, target: str) -> None:
    app, _, _ = site
    response = app.test_client().post("/dashboards/login",
                                      data={"api_key": API_KEY, "next": target})
    assert response.headers["Location"] == "/dashboards/templates"


def test_sessions_end_when_the_key_changes_or_they_expire(site) -> None:
    app, _, query = site
    client = logged_in_client(app)
    with client.session_transaction() as session:
        session["at"] = int(time.time()) - 13 * 3600
    assert client.get(f"/dashboards/templates?{query}").status_code == 302

    client = logged_in_client(app)
    settings = app.config["OPENTRACK"]
    app.config["OPENTRACK"] = dataclasses.replace(settings, api_key="a-new-key")
    try:
        assert client.get(f"/dashboards/templates?{query}").status_code == 302
    finally:
        app.config["OPENTRACK"] = settings


@pytest.mark.parametrize("name,charts", [("templates", 4), ("subjects", 4),
                                         ("sequences", 2), ("follow-ups", 1), ("timing", 3)])
def test_each_page_renders_tables_and_charts(site, name: str, charts: int) -> None:
    app, x, query = site
    client = logged_in_client(app)
    response = client.get(f"/dashboards/{name}?{query}")
    assert response.status_code == 200, response.data[:500]
    html = response.get_data(as_text=True)
    blocks = re.findall(r'<script type="application/json" class="chart-data" '
                        r'data-target="([^"]+)">(.*?)</script>', html, re.S)
    assert len(blocks) >= charts
    for _, payload in blocks:
        figure = json.loads(payload)
        assert figure["data"] and "layout" in figure
    assert "/dashboards/static/plotly.min.js" in html and "cdn" not in html.lower()
    assert "format=csv" in html
    assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert response.headers["Cache-Control"] == "no-store"
    if name == "templates":
        assert x.id("A") in html and "significant" in html and "too small to conclude" in html
    if name == "follow-ups":
        assert x.id("A4") in html and "25 emails" in html


@pytest.mark.parametrize("name,first", [("templates", "template_id,key,sent"),
                                        ("sequences", "sequence_id,sequence_step,key,sent"),
                                        ("follow-ups", "email_id,"), ("timing", "weekday,")])
def test_csv_downloads(site, name: str, first: str) -> None:
    app, _, query = site
    response = logged_in_client(app).get(f"/dashboards/{name}?{query}&format=csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert response.get_data(as_text=True).startswith(first)


def test_bad_parameters_show_on_the_page(site) -> None:
    app, _, query = site
    client = logged_in_client(app)
    response = client.get(f"/dashboards/templates?{query}&from=someday")
    assert response.status_code == 400 and b"is not a time" in response.data
    response = client.get(f"/dashboards/timing?{query}&tz=Nowhere/Land")
    assert response.status_code == 400 and b"IANA" in response.data


def test_hostile_subject_is_escaped(site) -> None:
    app, x, _ = site
    client = logged_in_client(app)
    html = client.get(f"/dashboards/subjects?template_id={x.id('A')}").get_data(as_text=True)
    assert "alert" in html  # it is there ...
    assert HOSTILE not in html and "<img src=x" not in html  # ... but never as markup
    assert html.count("</script>") == html.count("<script")


def test_plotly_and_styles_are_served_locally(site) -> None:
    app, _, _ = site
    client = app.test_client()
    js = client.get("/dashboards/static/plotly.min.js")
    assert js.status_code == 200 and js.mimetype == "text/javascript"
    assert len(js.data) > 1_000_000 and b"plotly" in js.data[:2000].lower()
    assert client.get("/dashboards/static/style.css").status_code == 200
    assert client.get("/dashboards/static/dashboards.js").status_code == 200


def test_an_unreachable_warehouse_is_a_message(tmp_path) -> None:
    from warehouse.engines import WarehouseUnavailable

    class Down:
        def query(self, sql, params=None):
            raise WarehouseUnavailable("down")

    client = logged_in_client(make_app(Down(), tmp_path))
    for name in PAGES:
        response = client.get(f"/dashboards/{name}")
        assert response.status_code == 503 and b"unavailable" in response.data

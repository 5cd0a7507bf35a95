"""GET /v1/analytics/compare, /follow-ups and /timing through the web app, on both engines."""

from __future__ import annotations

import csv
import io

import pytest

from tests.test_analytics_world import (
    API_KEY,
    HOUR,
    T0,
    build_exact,
    load_events,
    make_app,
    new_tag,
)
from warehouse.engines import WarehouseUnavailable

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def api(warehouse_engine, tmp_path_factory) -> tuple:
    x = build_exact(new_tag("api"))
    load_events(warehouse_engine, x.events)
    app = make_app(warehouse_engine, tmp_path_factory.mktemp("api"))
    scope = [("template_id", x.id(t)) for t in "ABC"]
    return app.test_client(), x, scope


def get(client, path: str, params: list[tuple[str, str]] | dict, headers=AUTH):
    return client.get(path, query_string=params, headers=headers)


def test_key_required(api) -> None:
    client, _, scope = api
    for path in ("/v1/analytics/compare", "/v1/analytics/follow-ups", "/v1/analytics/timing"):
        assert get(client, path, scope, headers={}).status_code == 401
        wrong = get(client, path, scope, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json["error"] == "invalid API key"


def test_compare_json(api) -> None:
    client, x, scope = api
    response = get(client, "/v1/analytics/compare", [*scope, ("by", "template")])
    assert response.status_code == 200, response.json
    body = response.json
    assert body["by"] == "template" and body["metric"] == "human_open_rate"
    assert body["baseline"] == x.id("B") and body["alpha"] == 0.05
    assert body["filters"]["template_id"] == [x.id(t) for t in "ABC"]
    rows = {row["key"]: row for row in body["rows"]}
    a = rows[x.id("A")]
    assert (a["sent"], a["opened"], a["human_opened"], a["total_opens"], a["replies"]) == (
        40, 25, 20, 29, 2)
    assert a["open_rate"] == 0.625 and a["human_open_rate"] == 0.5
    lo, hi = a["human_open_rate_ci"]
    assert lo == pytest.approx(0.352, abs=5e-4) and hi == pytest.approx(0.648, abs=5e-4)
    assert a["p_value"] < 0.01 and a["significant"] is True and a["warning"] is None
    assert rows[x.id("B")]["p_value"] is None and rows[x.id("B")]["is_baseline"] is True
    assert "too small" in rows[x.id("C")]["warning"]
    assert a["time_to_first_human_open_median_s"] == 660


def test_compare_every_grouping_baseline_and_range(api) -> None:
    client, x, scope = api
    for by, keys in (("subject", 4), ("sequence", 1), ("sequence_step", 2)):
        response = get(client, "/v1/analytics/compare", [*scope, ("by", by)])
        assert response.status_code == 200 and len(response.json["rows"]) == keys
    named = get(client, "/v1/analytics/compare",
                [*scope, ("by", "sequence_step"), ("baseline", f"{x.id('S')}/2")]).json
    assert named["baseline"] == f"{x.id('S')}/2"
    ranged = get(client, "/v1/analytics/compare",
                 [*scope, ("from", "2030-01-01T12:00:00Z"), ("to", "2030-01-02")]).json
    assert [row["key"] for row in ranged["rows"]] == [x.id("C")]  # to=<date>: that day too
    assert ranged["filters"]["from"] == "2030-01-01T12:00:00.000Z"
    assert ranged["filters"]["to"] == "2030-01-03T00:00:00.000Z"
    ms = get(client, "/v1/analytics/compare", [*scope, ("to", str(T0 + HOUR))]).json
    assert {row["key"] for row in ms["rows"]} == {x.id("A"), x.id("B")}


def test_compare_csv(api) -> None:
    client, x, scope = api
    response = get(client, "/v1/analytics/compare", [*scope, ("format", "csv")])
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [row["key"] for row in rows] == [x.id("B"), x.id("A"), x.id("C")]
    a = rows[1]
    assert a["sent"] == "40" and float(a["human_open_rate_ci_lo"]) == pytest.approx(0.352, abs=5e-4)
    assert rows[0]["p_value"] == "" and a["significant"] == "True"


@pytest.mark.parametrize("params,field", [
    ({"by": "weekday"}, "by"),
    ({"from": "yesterday"}, "from"),
    ({"from": "99999999999999999999"}, "from"),
    ({"to": "2030-13-01"}, "to"),
    ({"from": "2030-02-01", "to": "2030-01-01"}, "to"),
    ({"baseline": "no-such-template"}, "baseline"),
    ({"metric": "clicks"}, "metric"),
    ({"person_type": "robot"}, "person_type"),
    ({"profile": "p1"}, "profile"),
    ({"format": "xml"}, "format"),
    ({"by": ["template", "subject"]}, "by"),
])
def test_compare_bad_parameters(api, params: dict, field: str) -> None:
    client, _, scope = api
    query = [*scope] + [(k, v) for k, vs in params.items()
                        for v in (vs if isinstance(vs, list) else [vs])]
    response = get(client, "/v1/analytics/compare", query)
    assert response.status_code == 400, response.json
    assert response.json["field"] == field and response.json["error"]


def test_follow_ups(api) -> None:
    client, x, _ = api
    query = {"profile_id": x.id("p1"), "limit": 5}
    first = get(client, "/v1/analytics/follow-ups", query).json
    assert len(first["rows"]) == 5 and first["next_offset"] == 5 and first["sort"] == "recent"
    top = first["rows"][0]
    assert top["email_id"] == x.id("A4") and top["human_open_count"] == 2
    assert top["last_human_opened_at"] == "2030-01-01T06:00:00.000Z"
    assert top["sent_at"] == "2030-01-01T00:00:00.000Z" and top["sequence_step"] == 1
    rest = get(client, "/v1/analytics/follow-ups", {**query, "limit": 100, "offset": 5}).json
    assert len(rest["rows"]) == 22 - 5 and rest["next_offset"] is None
    everyone = {r["email_id"] for r in first["rows"] + rest["rows"]}
    assert not everyone & {x.id("A0"), x.id("A3"), x.id("A5"), x.id("B0")}  # replied/unsub.
    csv_text = get(client, "/v1/analytics/follow-ups", {**query, "format": "csv"}).get_data(
        as_text=True)
    assert csv_text.splitlines()[1].startswith(x.id("A4") + ",")
    for bad, field in (({"sort": "oldest"}, "sort"), ({"limit": 0}, "limit"),
                       ({"limit": "ten"}, "limit"), ({"offset": -1}, "offset")):
        response = get(client, "/v1/analytics/follow-ups", {**query, **bad})
        assert response.status_code == 400 and response.json["field"] == field


def test_timing(api) -> None:
    client, _, scope = api
    body = get(client, "/v1/analytics/timing", [*scope, ("tz", "Europe/Berlin")]).json
    assert body["tz"] == "Europe/Berlin" and len(body["rows"]) == 168
    cell = next(r for r in body["rows"] if (r["weekday"], r["hour"]) == (2, 1))
    assert cell["sent"] == 82 and cell["weekday_name"] == "Tue"
    bad = get(client, "/v1/analytics/timing", [*scope, ("tz", "Mars/Olympus")])
    assert bad.status_code == 400 and bad.json["field"] == "tz"
    text = get(client, "/v1/analytics/timing", [*scope, ("format", "csv")]).get_data(as_text=True)
    assert text.splitlines()[0].startswith("weekday,weekday_name,hour,")
    assert len(text.splitlines()) == 169


def test_unreachable_warehouse_is_a_503(tmp_path) -> None:
    class Down:
        def query(self, sql, params=None):
            raise WarehouseUnavailable("down")

    client = make_app(Down(), tmp_path).test_client()
    response = get(client, "/v1/analytics/compare", {})
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"

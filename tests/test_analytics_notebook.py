"""The notebook functions: the same DataFrames as the API, from an engine or from Settings."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from dashboards import analytics, notebook
from dashboards.params import BadParameter, Filters
from opentrack.settings import Settings
from tests.test_analytics_world import API_KEY, SECRET, build_exact, load_events, new_tag
from warehouse.engines import ServerEngine
from warehouse.schema import migrate


@pytest.fixture(scope="module")
def exact(warehouse_engine) -> tuple:
    x = build_exact(new_tag("nb"))
    load_events(warehouse_engine, x.events)
    return warehouse_engine, x, [x.id(t) for t in "ABC"]


def test_compare_from_an_engine(exact) -> None:
    engine, x, templates = exact
    df = notebook.compare(engine, "subject", template_ids=templates, person_type="candidate")
    expected = analytics.compare(engine, "subject",
                                 Filters(template_ids=tuple(templates), person_type="candidate"))
    pd.testing.assert_frame_equal(df, expected)
    assert set(df["key"]) == {x.id("hello"), x.id("hi"), x.id("b")}


def test_dates_and_other_reads(exact) -> None:
    engine, x, templates = exact
    # C was sent on 2030-01-02; end=<date> includes that day, start=<date> starts at midnight
    only_c = notebook.compare(engine, template_ids=templates, start=date(2030, 1, 2),
                              end="2030-01-02")
    assert list(only_c["key"]) == [x.id("C")]
    queue = notebook.follow_ups(engine, profile_id=x.id("p1"), sort="reopened")
    assert queue.iloc[0]["email_id"] == x.id("A4") and len(queue) == 22
    assert isinstance(queue.iloc[0]["last_human_opened_at"], pd.Timestamp)
    grid = notebook.timing(engine, template_ids=templates, tz="Asia/Tokyo")
    assert len(grid) == 168 and grid["sent"].sum() == 92
    with pytest.raises(BadParameter):
        notebook.timing(engine, tz="Not/AZone")
    with pytest.raises(BadParameter):
        notebook.compare(engine, by="day")


def test_compare_from_settings_of_a_server(clickhouse_server, tmp_path) -> None:
    engine = ServerEngine(clickhouse_server.url)
    migrate(engine)
    x = build_exact(new_tag("nbs"))
    load_events(engine, x.events)
    settings = Settings.from_env({
        "OPENTRACK_DATA_DIR": str(tmp_path), "OPENTRACK_API_KEY": API_KEY,
        "OPENTRACK_SECRET": SECRET, "OPENTRACK_CLICKHOUSE_URL": clickhouse_server.url,
    })
    df = notebook.compare(settings, "sequence_step", template_ids=[x.id(t) for t in "ABC"])
    assert list(df["key"]) == [f"{x.id('S')}/1", f"{x.id('S')}/2"]
    assert list(df["sent"]) == [40, 42]
    assert isinstance(notebook.engine_for(settings), ServerEngine)

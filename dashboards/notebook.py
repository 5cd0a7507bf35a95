"""The comparisons as pandas DataFrames, for notebooks: the same numbers as the API and pages.

    from dashboards import notebook
    df = notebook.compare(settings_or_engine, by="subject", start="2026-01-01",
                          profile_id="recruiter-anna")

``source`` is an ``Engine`` or ``Settings`` (then: the ClickHouse server if one is
configured, else the embedded warehouse - through the running loader's socket when the stack
is up, opened directly when it is not, since chDB allows one process per data path).
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards import analytics
from dashboards.params import Filters, parse_time, timezone
from dashboards.stats import ALPHA
from opentrack.settings import Settings
from warehouse.engines import Engine, reader_engine, writer_engine

Time = str | int | date | datetime | None


def engine_for(source: Engine | Settings) -> Engine:
    if not isinstance(source, Settings):
        return source
    if source.clickhouse_url or Path(source.warehouse_socket).exists():
        return reader_engine(source.clickhouse_url, source.warehouse_socket)
    return writer_engine(None, source.data_dir)


def _time(value: Time, name: str, end_of_day: bool = False) -> int | None:
    if isinstance(value, datetime | date):
        value = value.isoformat()
    return parse_time(value, name, end_of_day)


def filters(
    start: Time = None,
    end: Time = None,
    profile_id: str | None = None,
    person_type: str | None = None,
    template_ids: tuple[str, ...] | list[str] = (),
    sequence_ids: tuple[str, ...] | list[str] = (),
) -> Filters:
    """Filters from Python values; times as in the API (a bare date as ``end`` includes it)."""
    return Filters(
        start=_time(start, "start"), end=_time(end, "end", end_of_day=True),
        profile_id=profile_id, person_type=person_type,
        template_ids=tuple(template_ids), sequence_ids=tuple(sequence_ids),
    )


def compare(
    source: Engine | Settings,
    by: str = "template",
    *,
    baseline: str | None = None,
    metric: str = "human_open_rate",
    alpha: float = ALPHA,
    **filter_args: Any,
) -> pd.DataFrame:
    """One row per template, subject, sequence or sequence step (see ``analytics.compare``);
    keyword filters as in ``filters()``."""
    return analytics.compare(engine_for(source), by, filters(**filter_args),
                             baseline, metric, alpha)


def follow_ups(
    source: Engine | Settings, *, sort: str = "recent", limit: int = 1000, offset: int = 0,
    **filter_args: Any,
) -> pd.DataFrame:
    return analytics.follow_ups(engine_for(source), filters(**filter_args),
                                sort, limit, offset)


def timing(source: Engine | Settings, *, tz: str = "UTC", **filter_args: Any) -> pd.DataFrame:
    return analytics.timing(engine_for(source), filters(**filter_args), timezone({"tz": tz}))

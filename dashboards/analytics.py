"""Comparisons, follow-ups and timing as DataFrames: warehouse counts plus the statistics.

This is the one place the API, the pages and notebooks get their numbers from, so the three
always agree. Rates of opening are over tracked sends (a send without a pixel cannot be seen
opening); reply and unsubscribe rates are over all sends.
"""

from __future__ import annotations

import contextlib
import io
import math
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from dashboards import queries, stats
from dashboards.params import GROUPINGS, METRICS, SORTS, BadParameter, Filters, check
from warehouse.engines import Engine

# rate -> (successes column, trials column, what a success is, for warnings)
RATES: dict[str, tuple[str, str, str]] = {
    "open_rate": ("opened", "tracked", "tracked sends opened"),
    "human_open_rate": ("human_opened", "tracked", "tracked sends opened by a person"),
    "reply_rate": ("replies", "sent", "sends replied to"),
    "unsubscribe_rate": ("unsubscribes", "sent", "sends unsubscribed from"),
}
assert set(RATES) == set(METRICS), "every metric is a rate"

COUNTS = ("sent", "tracked", "opened", "human_opened", "total_opens", "human_opens",
          "replies", "unsubscribes")
KEY_COLUMNS = {by: queries.GROUP_COLUMNS[by][0] for by in GROUPINGS}
COMPARE_COLUMNS = (
    "key", "sent", "tracked", "opened", "open_rate", "open_rate_ci_lo", "open_rate_ci_hi",
    "human_opened", "human_open_rate", "human_open_rate_ci_lo", "human_open_rate_ci_hi",
    "machine_only_opened", "total_opens", "human_opens", "machine_opens", "opens_per_opener",
    "human_opens_per_opener", "replies", "reply_rate", "reply_rate_ci_lo", "reply_rate_ci_hi",
    "unsubscribes", "unsubscribe_rate", "unsubscribe_rate_ci_lo", "unsubscribe_rate_ci_hi",
    "time_to_first_human_open_median_s", "time_to_first_human_open_p90_s",
    "metric", "is_baseline", "p_value", "test", "p_adjusted", "significant", "warning",
)
TIMING_COLUMNS = ("weekday", "weekday_name", "hour", "human_opens", "machine_opens", "sent",
                  "tracked", "human_opened", "human_open_rate", "replies", "reply_rate")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


_MODERN: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _is_modern(engine: Engine) -> bool:
    """Whether the engine's ClickHouse takes settings 18.16 does not know (asked once)."""
    try:
        return _MODERN[engine]
    except (KeyError, TypeError):
        pass
    version = str(engine.query("SELECT version() AS v")[0]["v"])
    modern = int(version.split(".")[0]) >= 21
    with contextlib.suppress(TypeError):  # an engine that cannot be weakly referenced
        _MODERN[engine] = modern
    return modern


def run(engine: Engine, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a read; 18.16 refuses settings it does not know, so only newer engines get them."""
    if _is_modern(engine):
        sql = f"{sql}\n{queries.MODERN_SETTINGS}"
    return engine.query(sql, params)


def key_label(by: str, row: dict[str, Any]) -> str:
    """The group's name as shown and as ``baseline=`` takes it (a step: ``sequence/step``)."""
    if by == "sequence_step":
        return f"{row['sequence_id']}/{row['sequence_step']}"
    return str(row[KEY_COLUMNS[by][0]])


def compare(
    engine: Engine,
    by: str = "template",
    filters: Filters | None = None,
    baseline: str | None = None,
    metric: str = "human_open_rate",
    alpha: float = stats.ALPHA,
) -> pd.DataFrame:
    """One row per group: counts, rates with Wilson intervals, time to first human open, and
    the test of ``metric`` against the baseline (the group with the most sends unless named),
    Holm-corrected over all groups compared."""
    check("by", by, GROUPINGS)
    check("metric", metric, METRICS)
    sql, params = queries.compare(by, filters or Filters())
    rows = run(engine, sql, params)
    keys = KEY_COLUMNS[by]
    df = pd.DataFrame(rows, columns=[*keys, *COUNTS, "first_human_open_ms"])
    df.insert(0, "key", [key_label(by, row) for row in rows])
    if by == "sequence_step":
        df = df.sort_values(["sequence_id", "sequence_step"])
    else:
        df = df.sort_values(["sent", "key"], ascending=[False, True])
    df = df.reset_index(drop=True)
    for column in COUNTS:
        df[column] = df[column].astype("int64")
    _add_rates(df)
    _add_timing(df)
    _add_tests(df, metric, _baseline_index(df, metric, baseline), alpha)
    return df[[*keys, *COMPARE_COLUMNS]]


def _add_rates(df: pd.DataFrame) -> None:
    for name, (successes, trials, _) in RATES.items():
        pairs = list(zip(df[successes], df[trials], strict=True))
        intervals = [stats.wilson_interval(int(x), int(n)) or (None, None) for x, n in pairs]
        df[name] = [stats.rate(int(x), int(n)) for x, n in pairs]
        df[f"{name}_ci_lo"] = [lo for lo, _ in intervals]
        df[f"{name}_ci_hi"] = [hi for _, hi in intervals]
    df["machine_only_opened"] = df["opened"] - df["human_opened"]
    df["machine_opens"] = df["total_opens"] - df["human_opens"]
    df["opens_per_opener"] = [stats.rate(x, n) for x, n in zip(df["total_opens"], df["opened"],
                                                                strict=True)]
    df["human_opens_per_opener"] = [
        stats.rate(x, n) for x, n in zip(df["human_opens"], df["human_opened"], strict=True)
    ]
    for name in RATES:  # None -> NaN, so the columns are float
        for column in (name, f"{name}_ci_lo", f"{name}_ci_hi"):
            df[column] = df[column].astype("float64")
    for column in ("opens_per_opener", "human_opens_per_opener"):
        df[column] = df[column].astype("float64")


def _add_timing(df: pd.DataFrame) -> None:
    """Median and p90 of send → first human open, in seconds (exact quantiles: the value at
    position floor(q·n) of the sorted times)."""
    for position, column in enumerate(("median", "p90")):
        df[f"time_to_first_human_open_{column}_s"] = [
            quantiles[position] / 1000 if opened else math.nan
            for quantiles, opened in zip(df["first_human_open_ms"], df["human_opened"],
                                         strict=True)
        ]


def _baseline_index(df: pd.DataFrame, metric: str, baseline: str | None) -> int | None:
    if baseline is not None:
        matches = df.index[df["key"] == baseline]
        if not len(matches):
            known = ", ".join(repr(k) for k in df["key"][:20])
            raise BadParameter(
                "baseline", f"baseline={baseline!r} is not a group of these results"
                + (f"; groups: {known}" if known else " (there are none)")
            )
        return int(matches[0])
    if df.empty:
        return None
    trials = df[RATES[metric][1]]
    return int(trials.idxmax())  # the first of the largest, in the order shown


def _add_tests(df: pd.DataFrame, metric: str, base: int | None, alpha: float) -> None:
    successes, trials, event = RATES[metric]
    df["metric"] = metric
    df["is_baseline"] = df.index == base
    results: list[stats.TestResult | None] = []
    for i in df.index:
        if base is None or i == base:
            results.append(None)
            continue
        results.append(stats.two_proportion_test(
            int(df.at[i, successes]), int(df.at[i, trials]),
            int(df.at[base, successes]), int(df.at[base, trials]),
        ))
    p_values = [r.p_value if r else None for r in results]
    adjusted = stats.holm(p_values)
    df["p_value"] = pd.Series(p_values, index=df.index, dtype="float64")
    df["test"] = [r.test if r else None for r in results]
    df["p_adjusted"] = pd.Series(adjusted, index=df.index, dtype="float64")
    df["significant"] = [p is not None and p < alpha for p in adjusted]
    df["warning"] = [
        stats.small_sample_warning(int(x), int(n), event)
        for x, n in zip(df[successes], df[trials], strict=True)
    ]


def _timestamp(ms: Iterable[int]) -> pd.Series:
    """Epoch ms → UTC timestamps, 0 (the warehouse's "never") → NaT."""
    values = pd.Series(list(ms), dtype="int64")
    return pd.to_datetime(values.where(values > 0), unit="ms", utc=True)


def follow_ups(
    engine: Engine,
    filters: Filters | None = None,
    sort: str = "recent",
    limit: int = 100,
    offset: int = 0,
) -> pd.DataFrame:
    """The follow-up queue: sends a person opened that got no reply (nor an unsubscribe),
    most recently opened first (``sort="reopened"``: most human opens first)."""
    check("sort", sort, SORTS)
    sql, params = queries.follow_ups(filters or Filters(), sort, limit, offset)
    columns = [*queries.FOLLOW_UP_COLUMNS, "open_count", "human_open_count",
               "last_human_opened_at"]
    df = pd.DataFrame(run(engine, sql, params), columns=columns)
    for column in ("sent_at", "last_human_opened_at"):
        df[column] = _timestamp(df[column])
    df["sequence_id"] = df["sequence_id"].replace("", None)
    df["sequence_step"] = df["sequence_step"].where(df["sequence_step"] > 0).astype("Int64")
    return df


def follow_up_counts(engine: Engine, filters: Filters | None = None) -> pd.DataFrame:
    """Queue length per profile, longest first."""
    sql, params = queries.follow_up_counts(filters or Filters())
    df = pd.DataFrame(run(engine, sql, params), columns=["profile_id", "follow_ups"])
    return df.sort_values(["follow_ups", "profile_id"], ascending=[False, True],
                          ignore_index=True)


def timing(engine: Engine, filters: Filters | None = None, tz: str = "UTC") -> pd.DataFrame:
    """168 rows, weekday × hour in ``tz``: counted opens made then (of the sends in scope),
    and the sends made then with how many a person opened and replied to."""
    filters = filters or Filters()
    grid = pd.DataFrame(
        [(day, hour) for day in range(1, 8) for hour in range(24)], columns=["weekday", "hour"]
    )
    opens_sql, opens_params = queries.open_timing(filters, tz)
    opens = pd.DataFrame(run(engine, opens_sql, opens_params),
                         columns=["weekday", "hour", "human_opens", "machine_opens"])
    sends_sql, sends_params = queries.send_timing(filters, tz)
    sends = pd.DataFrame(run(engine, sends_sql, sends_params),
                         columns=["weekday", "hour", *COUNTS, "first_human_open_ms"])
    df = grid.merge(opens, on=["weekday", "hour"], how="left").merge(
        sends[["weekday", "hour", "sent", "tracked", "human_opened", "replies"]],
        on=["weekday", "hour"], how="left",
    )
    counts = ["human_opens", "machine_opens", "sent", "tracked", "human_opened", "replies"]
    df[counts] = df[counts].fillna(0).astype("int64")
    df["weekday_name"] = [WEEKDAYS[d - 1] for d in df["weekday"]]
    for name in ("human_open_rate", "reply_rate"):
        successes, trials, _ = RATES[name]
        df[name] = [stats.rate(x, n) for x, n in zip(df[successes], df[trials], strict=True)]
        df[name] = df[name].astype("float64")
    return df[list(TIMING_COLUMNS)]


# --- presentation: JSON records and CSV, shared by the API and the pages ------------------
def _plain(value: Any) -> Any:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime().astimezone(UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def plain_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of plain Python values: NaN/NaT/NA → None, times → ISO 8601 UTC."""
    return [{name: _plain(value) for name, value in row.items()}
            for row in df.astype(object).to_dict("records")]


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: ``plain_rows`` with ``x_ci_lo``/``x_ci_hi`` → ``x_ci: [lo, hi]``."""
    out = plain_rows(df)
    for plain in out:
        for name in RATES:
            if f"{name}_ci_lo" in plain:
                lo, hi = plain.pop(f"{name}_ci_lo"), plain.pop(f"{name}_ci_hi")
                plain[f"{name}_ci"] = None if lo is None else [lo, hi]
    return out


def to_csv(df: pd.DataFrame) -> str:
    out = df.copy()
    for column in out.columns:
        if isinstance(out[column].dtype, pd.DatetimeTZDtype):
            out[column] = [_plain(value) for value in out[column]]
    buffer = io.StringIO()
    out.to_csv(buffer, index=False)
    return buffer.getvalue()

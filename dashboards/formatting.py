"""How numbers read in the dashboards' tables (the CSV and JSON keep them raw)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

DASH = "–"


def missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, float) and math.isnan(value))


def number(value: Any) -> str:
    if missing(value):
        return DASH
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def pct(value: Any, digits: int = 1) -> str:
    return DASH if missing(value) else f"{100 * value:.{digits}f} %"


def interval(lo: Any, hi: Any) -> str:
    if missing(lo) or missing(hi):
        return DASH
    return f"{100 * lo:.1f}–{100 * hi:.1f} %"


def pvalue(value: Any) -> str:
    if missing(value):
        return DASH
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def duration(seconds: Any) -> str:
    if missing(seconds):
        return DASH
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{minutes} min"
    if seconds < 86400:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{days} d {hours % 24} h"


def when(value: Any) -> str:
    if missing(value):
        return DASH
    return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M UTC")

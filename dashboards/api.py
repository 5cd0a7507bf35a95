"""The analytics JSON/CSV API: /v1/analytics/compare, /follow-ups and /timing.

Parameters (all optional; a misspelt one is refused with a 400):

- filters, everywhere: ``from``, ``to`` (on sent_at; ISO 8601 or epoch ms; a bare date as
  ``to`` includes that day), ``profile_id``, ``person_type``, ``template_id`` and
  ``sequence_id`` (each may repeat), ``format=json|csv``;
- compare: ``by=template|subject|sequence|sequence_step``, ``metric`` (the rate tested:
  human_open_rate, open_rate, reply_rate, unsubscribe_rate), ``baseline`` (a row's key);
- follow-ups: ``sort=recent|reopened``, ``limit`` (1-1000, default 100), ``offset``;
- timing: ``tz`` (IANA zone for weekday and hour, default UTC).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from flask import Blueprint, Response, current_app, jsonify, request

from dashboards import analytics
from dashboards.params import (
    FOLLOW_UP_NAMES,
    MAX_LIMIT,
    SORTS,
    TIMING_NAMES,
    BadParameter,
    Filters,
    choice,
    compare_options,
    integer,
    only_known,
    output_format,
    parse_filters,
    timezone,
)
from dashboards.stats import ALPHA
from opentrack.auth import require_api_key
from opentrack.http import json_error
from warehouse.engines import Engine, WarehouseUnavailable
from warehouse.reads import iso

bp = Blueprint("analytics", __name__)


def engine() -> Engine:
    return current_app.extensions["opentrack.warehouse"]()


@bp.errorhandler(BadParameter)
def bad_parameter(exc: BadParameter) -> Response:
    return json_error(400, exc.message, field=exc.field)


@bp.errorhandler(WarehouseUnavailable)
def unavailable(exc: WarehouseUnavailable) -> Response:
    response = json_error(503, "the warehouse is unavailable right now; retry shortly")
    response.headers["Retry-After"] = "2"
    return response


def filters_echo(filters: Filters) -> dict[str, Any]:
    """The filters as understood, so a client sees how its times were read."""
    return {
        "from": iso(filters.start), "to": iso(filters.end), "profile_id": filters.profile_id,
        "person_type": filters.person_type, "template_id": list(filters.template_ids),
        "sequence_id": list(filters.sequence_ids),
    }


def csv_response(df: pd.DataFrame, name: str) -> Response:
    return Response(
        analytics.to_csv(df), mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def answer(df: pd.DataFrame, name: str, fmt: str, **extra: Any) -> Response:
    if fmt == "csv":
        return csv_response(df, name)
    return jsonify({**extra, "rows": analytics.records(df)})


@bp.get("/v1/analytics/compare")
@require_api_key
def compare() -> Response:
    options = compare_options(request.args)
    fmt = output_format(request.args)
    df = analytics.compare(engine(), options.by, options.filters, options.baseline,
                           options.metric)
    base = df.loc[df["is_baseline"], "key"]
    return answer(
        df, f"compare-by-{options.by}", fmt, by=options.by, metric=options.metric,
        baseline=None if base.empty else base.iloc[0], alpha=ALPHA,
        filters=filters_echo(options.filters),
    )


@bp.get("/v1/analytics/follow-ups")
@require_api_key
def follow_ups() -> Response:
    only_known(request.args, FOLLOW_UP_NAMES)
    filters = parse_filters(request.args)
    sort = choice(request.args, "sort", SORTS, "recent")
    limit = integer(request.args, "limit", 100, 1, MAX_LIMIT)
    offset = integer(request.args, "offset", 0, 0, 10**9)
    fmt = output_format(request.args)
    df = analytics.follow_ups(engine(), filters, sort, limit, offset)
    next_offset = offset + limit if len(df) == limit else None
    return answer(df, "follow-ups", fmt, sort=sort, next_offset=next_offset,
                  filters=filters_echo(filters))


@bp.get("/v1/analytics/timing")
@require_api_key
def timing() -> Response:
    only_known(request.args, TIMING_NAMES)
    filters = parse_filters(request.args)
    tz = timezone(request.args)
    fmt = output_format(request.args)
    df = analytics.timing(engine(), filters, tz)
    return answer(df, "timing", fmt, tz=tz, filters=filters_echo(filters))

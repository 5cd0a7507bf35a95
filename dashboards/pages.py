"""The analysts' pages under /dashboards/: server-rendered, charts drawn by plotly.js.

Login: a form posts the API key; the answer is a Flask session cookie (signed with a key
derived from ``OPENTRACK_SECRET``, HttpOnly, SameSite=Lax) holding an HMAC fingerprint of
the key, never the key, so the key never appears in a URL, a log line or the cookie, and
changing the API key ends every session. Sessions also end after ``SESSION_HOURS``.
SameSite=Lax keeps the cookie off cross-site POSTs, which is what protects the two forms.

Every page takes the API's filter parameters, so a page's URL and the API call behind it
read the same, and ``format=csv`` on a page downloads its table.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from functools import wraps
from importlib import resources
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState

from dashboards import analytics, charts, formatting, queries
from dashboards.api import csv_response
from dashboards.params import (
    FOLLOW_UP_NAMES,
    METRICS,
    SORTS,
    TIMING_NAMES,
    BadParameter,
    choice,
    compare_options,
    integer,
    only_known,
    output_format,
    parse_filters,
    timezone,
)
from dashboards.stats import MIN_TRIALS
from opentrack.auth import api_key_matches
from warehouse.engines import Engine, WarehouseUnavailable

SESSION_HOURS = 12
PAGE_SIZE = 100
NAV = (
    ("dashboards.templates", "Templates"),
    ("dashboards.subjects", "Subject lines"),
    ("dashboards.sequences", "Sequences"),
    ("dashboards.follow_ups", "Follow-ups"),
    ("dashboards.timing", "Timing"),
)
KEY_TITLES = {"template": "Template", "subject": "Subject line"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")

bp = Blueprint(
    "dashboards", __name__, url_prefix="/dashboards",
    template_folder="templates", static_folder="static", static_url_path="/static",
)


@bp.record_once
def configure_session(state: BlueprintSetupState) -> None:
    """The app's session is the dashboards' login: give it a key of its own (derived, so the
    token-signing secret itself never signs cookies) and safe cookie flags."""
    app = state.app
    settings = app.config["OPENTRACK"]
    if not app.secret_key:
        app.secret_key = hmac.new(settings.secret.encode(), b"opentrack dashboards session",
                                  hashlib.sha256).hexdigest()
    app.config.update(
        SESSION_COOKIE_NAME="opentrack_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "dashboards.static" and request.endpoint != "dashboards.plotly":
        response.headers["Cache-Control"] = "no-store"
    return response


def engine() -> Engine:
    return current_app.extensions["opentrack.warehouse"]()


def _fingerprint() -> str:
    settings = current_app.config["OPENTRACK"]
    return hmac.new(settings.secret.encode(), b"dashboards key " + settings.api_key.encode(),
                    hashlib.sha256).hexdigest()


def logged_in() -> bool:
    auth, at = session.get("auth"), session.get("at")
    return (isinstance(auth, str) and isinstance(at, int)
            and hmac.compare_digest(auth, _fingerprint())
            and 0 <= time.time() - at < SESSION_HOURS * 3600)


def _safe_next(target: str | None) -> str:
    """Only back into the dashboards: never an open redirect to another site."""
    default = url_for("dashboards.templates")
    if not target or not target.startswith("/dashboards/") or "//" in target or "\\" in target:
        return default
    return target


def render(template: str, status: int = 200, **context: Any) -> tuple[str, int]:
    context.setdefault("error", None)
    context.setdefault("charts", [])
    args = request.args.to_dict(flat=False)
    args.pop("format", None)
    html = render_template(
        f"dashboards/{template}", nav=NAV, fmt=formatting, args=request.args,
        csv_url=url_for(request.endpoint or "dashboards.templates", **args, format="csv"),
        **context,
    )
    return html, status


def page(template: str, title: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Login, then the view's context rendered into ``template``; a bad parameter or an
    unreachable warehouse become a message on the same page, not a stack trace."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not logged_in():
                target = request.full_path.rstrip("?")
                return redirect(url_for("dashboards.login", next=target))
            try:
                result = view(*args, **kwargs)
                if isinstance(result, Response):
                    return result
                profiles = _profiles()
            except BadParameter as exc:
                return render(template, 400, title=title, error=exc.message, profiles=[])
            except WarehouseUnavailable:
                return render(template, 503, title=title, profiles=[],
                              error="The warehouse is unavailable right now; retry shortly.")
            return render(template, title=title, profiles=profiles, **result)

        return run

    return decorate


def _profiles() -> list[str]:
    sql, params = queries.profile_ids()
    return [row["profile_id"] for row in engine().query(sql, params)]


# --- login ------------------------------------------------------------------------------
@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if logged_in():
            return redirect(target)
        return render_template("dashboards/login.html", next=target, error=None)
    given = request.form.get("api_key", "").strip()
    if not given or not api_key_matches(given, current_app.config["OPENTRACK"].api_key):
        html = render_template("dashboards/login.html", next=target,
                               error="That is not the API key.")
        return html, 401
    session.clear()
    session["auth"] = _fingerprint()
    session["at"] = int(time.time())
    return redirect(target)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("dashboards.login"))


@bp.get("/")
def index() -> Response:
    return redirect(url_for("dashboards.templates"))


@bp.get("/static/plotly.min.js")
def plotly() -> Response:
    """plotly.js from the installed plotly package: the browser needs no internet."""
    path = resources.files("plotly") / "package_data" / "plotly.min.js"
    return send_file(str(path), mimetype="text/javascript", max_age=86400)


# --- pages ------------------------------------------------------------------------------
def _comparison(by: str) -> dict[str, Any] | Response:
    options = compare_options(request.args, by=by)
    fmt = output_format(request.args)
    df = analytics.compare(engine(), by, options.filters, options.baseline, options.metric)
    if fmt == "csv":
        return csv_response(df, f"compare-by-{by}")
    figures = [] if df.empty else [
        charts.open_rates(df), charts.engagement_rates(df), charts.opens_by_class(df),
        charts.first_open_times(df),
    ]
    return {"rows": analytics.plain_rows(df), "charts": figures, "options": options,
            "metrics": METRICS, "key_title": KEY_TITLES[by]}


@bp.get("/templates")
@page("compare.html", "Templates")
def templates() -> Any:
    return _comparison("template")


@bp.get("/subjects")
@page("compare.html", "Subject lines")
def subjects() -> Any:
    return _comparison("subject")


@bp.get("/sequences")
@page("sequences.html", "Sequences")
def sequences() -> Any:
    options = compare_options(request.args, by="sequence")
    if output_format(request.args) == "csv":
        steps = analytics.compare(engine(), "sequence_step", options.filters, None,
                                  options.metric)
        return csv_response(steps, "sequence-steps")
    summary = analytics.compare(engine(), "sequence", options.filters, options.baseline,
                                options.metric)
    steps = analytics.compare(engine(), "sequence_step", options.filters, None, options.metric)
    funnels = []
    for number, (sequence_id, group) in enumerate(steps.groupby("sequence_id", sort=True)):
        funnels.append({
            "sequence_id": sequence_id,
            "rows": analytics.plain_rows(group),
            "charts": [charts.sequence_funnel(group, f"funnel-{number}", sequence_id),
                       charts.sequence_rates(group, f"steps-{number}", sequence_id)],
        })
    return {"rows": analytics.plain_rows(summary), "funnels": funnels,
            "options": options, "metrics": METRICS}


@bp.get("/follow-ups")
@page("follow_ups.html", "Follow-ups")
def follow_ups() -> Any:
    only_known(request.args, FOLLOW_UP_NAMES)
    filters = parse_filters(request.args)
    sort = choice(request.args, "sort", SORTS, "recent")
    limit = integer(request.args, "limit", PAGE_SIZE, 1, 1000)
    offset = integer(request.args, "offset", 0, 0, 10**9)
    df = analytics.follow_ups(engine(), filters, sort, limit, offset)
    if output_format(request.args) == "csv":
        return csv_response(df, "follow-ups")
    counts = analytics.follow_up_counts(engine(), filters)
    args = request.args.to_dict()
    more = {**args, "offset": offset + limit} if len(df) == limit else None
    less = {**args, "offset": max(0, offset - limit)} if offset else None
    return {
        "rows": analytics.plain_rows(df), "sort": sort, "sorts": SORTS,
        "total": int(counts["follow_ups"].sum()), "offset": offset,
        "charts": [charts.follow_up_queue(counts)] if not counts.empty else [],
        "next_url": url_for("dashboards.follow_ups", **more) if more else None,
        "previous_url": url_for("dashboards.follow_ups", **less) if less else None,
    }


@bp.get("/timing")
@page("timing.html", "Timing")
def timing() -> Any:
    only_known(request.args, TIMING_NAMES)
    filters = parse_filters(request.args)
    tz = timezone(request.args)
    df = analytics.timing(engine(), filters, tz)
    if output_format(request.args) == "csv":
        return csv_response(df, "timing")
    has_data = bool(df["sent"].sum() or df["human_opens"].sum())
    figures = [
        charts.timing_heatmap(df, "human_opens", "opens-heatmap",
                              f"When people open (human opens, {tz})"),
        charts.timing_heatmap(df, "human_open_rate", "send-heatmap",
                              f"Share opened by a person, by time of sending ({tz})",
                              min_trials=MIN_TRIALS),
        charts.opens_by_hour(df),
    ] if has_data else []
    best = df[df["tracked"] >= MIN_TRIALS].sort_values("human_open_rate", ascending=False).head(5)
    return {"charts": figures, "tz": tz, "min_trials": MIN_TRIALS, "has_data": has_data,
            "best": analytics.plain_rows(best)}


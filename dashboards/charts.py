"""Plotly figures of the analytics DataFrames, as JSON the pages hand to plotly.js.

Figures are built here in Python and rendered in the browser by the plotly.js that ships
inside the installed plotly package (no CDN: the machines are offline). The JSON is made safe
to sit inside a ``<script type="application/json">`` block: the data holds subject lines and
ids written by the CRM, and ``</script>`` in one of them must not end the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup

HUMAN, MACHINE, REPLY, UNSUBSCRIBE, NEUTRAL = "#2563eb", "#f59e0b", "#16a34a", "#dc2626", "#94a3b8"
_LAYOUT = dict(
    template="plotly_white", margin=dict(l=10, r=10, t=36, b=10), height=360,
    legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0),
    font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=12),
)


@dataclass(frozen=True)
class Chart:
    """One figure on a page: an element id and the figure's JSON."""

    id: str
    title: str
    json: Markup


def chart(chart_id: str, title: str, fig: go.Figure, height: int | None = None) -> Chart:
    """The title is the page's caption (HTML), so the plot's top holds the legend alone."""
    fig.update_layout(**_LAYOUT)
    if height:
        fig.update_layout(height=height)
    text = pio.to_json(fig, validate=False)
    safe = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Chart(chart_id, title, Markup(safe))


def _error(df: pd.DataFrame, rate: str) -> dict:
    """Asymmetric error bars from the Wilson interval columns."""
    return dict(
        type="data", symmetric=False,
        array=(df[f"{rate}_ci_hi"] - df[rate]).fillna(0).tolist(),
        arrayminus=(df[rate] - df[f"{rate}_ci_lo"]).fillna(0).tolist(),
        thickness=1.2, width=3,
    )


def _bar_height(rows: int) -> int:
    return max(300, 90 + 34 * rows)


def open_rates(df: pd.DataFrame, chart_id: str = "open-rates") -> Chart:
    """Human open rate (the headline) next to the rate with machine opens counted."""
    keys = df["key"].tolist()
    fig = go.Figure([
        go.Bar(name="opened by a person", y=keys, x=df["human_open_rate"], orientation="h",
               marker_color=HUMAN, error_x=_error(df, "human_open_rate")),
        go.Bar(name="opened, machines included", y=keys, x=df["open_rate"], orientation="h",
               marker_color=NEUTRAL, error_x=_error(df, "open_rate")),
    ])
    fig.update_layout(barmode="group", xaxis=dict(tickformat=".0%", rangemode="tozero"),
                      yaxis=dict(autorange="reversed", automargin=True))
    return chart(chart_id, "Open rate (95% Wilson interval)", fig, _bar_height(2 * len(keys)))


def engagement_rates(df: pd.DataFrame, chart_id: str = "engagement-rates") -> Chart:
    keys = df["key"].tolist()
    fig = go.Figure([
        go.Bar(name="reply rate", y=keys, x=df["reply_rate"], orientation="h",
               marker_color=REPLY, error_x=_error(df, "reply_rate")),
        go.Bar(name="unsubscribe rate", y=keys, x=df["unsubscribe_rate"], orientation="h",
               marker_color=UNSUBSCRIBE, error_x=_error(df, "unsubscribe_rate")),
    ])
    fig.update_layout(barmode="group", xaxis=dict(tickformat=".1%", rangemode="tozero"),
                      yaxis=dict(autorange="reversed", automargin=True))
    return chart(chart_id, "Replies and unsubscribes", fig, _bar_height(2 * len(keys)))


def opens_by_class(df: pd.DataFrame, chart_id: str = "opens-by-class") -> Chart:
    """Machine opens shown, not hidden: how much of the raw count they make up."""
    keys = df["key"].tolist()
    fig = go.Figure([
        go.Bar(name="human opens", y=keys, x=df["human_opens"], orientation="h",
               marker_color=HUMAN),
        go.Bar(name="machine opens", y=keys, x=df["machine_opens"], orientation="h",
               marker_color=MACHINE),
    ])
    fig.update_layout(barmode="stack", yaxis=dict(autorange="reversed", automargin=True))
    return chart(chart_id, "Counted opens by class", fig, _bar_height(len(keys)))


def first_open_times(df: pd.DataFrame, chart_id: str = "first-open") -> Chart:
    keys = df["key"].tolist()
    fig = go.Figure([
        go.Bar(name="median", y=keys, x=df["time_to_first_human_open_median_s"] / 3600,
               orientation="h", marker_color=HUMAN),
        go.Bar(name="90th percentile", y=keys, x=df["time_to_first_human_open_p90_s"] / 3600,
               orientation="h", marker_color=NEUTRAL),
    ])
    fig.update_layout(barmode="group", xaxis=dict(title="hours after sending"),
                      yaxis=dict(autorange="reversed", automargin=True))
    return chart(chart_id, "Time to first human open", fig, _bar_height(2 * len(keys)))


def sequence_funnel(steps: pd.DataFrame, chart_id: str, sequence_id: str) -> Chart:
    """Sent → opened by a person → replied, one funnel per step."""
    stages = ["sent", "opened by a person", "replied"]
    fig = go.Figure([
        go.Funnel(name=f"step {step}", y=stages,
                  x=[row["sent"], row["human_opened"], row["replies"]],
                  textinfo="value+percent initial")
        for step, row in zip(steps["sequence_step"], steps.to_dict("records"), strict=True)
    ])
    return chart(chart_id, f"{sequence_id}: funnel per step", fig)


def sequence_rates(steps: pd.DataFrame, chart_id: str, sequence_id: str) -> Chart:
    labels = [f"step {s}" for s in steps["sequence_step"]]
    fig = go.Figure([
        go.Scatter(name=name, x=labels, y=steps[rate], mode="lines+markers",
                   line=dict(color=color), error_y=_error(steps, rate))
        for name, rate, color in (
            ("opened by a person", "human_open_rate", HUMAN),
            ("replied", "reply_rate", REPLY),
            ("unsubscribed", "unsubscribe_rate", UNSUBSCRIBE),
        )
    ])
    fig.update_layout(yaxis=dict(tickformat=".0%", rangemode="tozero"))
    return chart(chart_id, f"{sequence_id}: rates per step", fig)


def follow_up_queue(counts: pd.DataFrame, chart_id: str = "queue") -> Chart:
    fig = go.Figure(go.Bar(x=counts["profile_id"], y=counts["follow_ups"], marker_color=HUMAN,
                           name="to follow up"))
    fig.update_layout(yaxis=dict(title="emails"), height=300)
    return chart(chart_id, "Follow-up queue per profile", fig)


def _grid(df: pd.DataFrame, column: str) -> list[list[float | None]]:
    pivot = df.pivot(index="weekday", columns="hour", values=column).sort_index()
    return [[None if pd.isna(v) else float(v) for v in row] for row in pivot.to_numpy()]


def timing_heatmap(df: pd.DataFrame, column: str, chart_id: str, title: str,
                   min_trials: int = 0) -> Chart:
    """Weekday × hour. A rate (``min_trials`` > 0) is left blank where fewer sends than that
    stand behind it: a 100 % of 2 sends would otherwise be the darkest cell."""
    days = df.drop_duplicates("weekday").sort_values("weekday")["weekday_name"].tolist()
    if min_trials:
        df = df.assign(**{column: df[column].where(df["tracked"] >= min_trials)})
    fig = go.Figure(go.Heatmap(
        z=_grid(df, column), x=list(range(24)), y=days, colorscale="Blues",
        hoverongaps=False, colorbar=dict(tickformat=".0%" if min_trials else ""),
        customdata=_grid(df, "tracked"),
        hovertemplate="%{y} %{x}:00<br>%{z" + (":.1%" if min_trials else "") + "}"
        + ("<br>%{customdata} tracked sends" if min_trials else "") + "<extra></extra>",
    ))
    fig.update_layout(xaxis=dict(title="hour", dtick=2), yaxis=dict(autorange="reversed"),
                      height=320)
    return chart(chart_id, title, fig)


def opens_by_hour(df: pd.DataFrame, chart_id: str = "opens-by-hour") -> Chart:
    hourly = df.groupby("hour", as_index=False)[["human_opens", "machine_opens"]].sum()
    fig = go.Figure([
        go.Bar(name="human opens", x=hourly["hour"], y=hourly["human_opens"],
               marker_color=HUMAN),
        go.Bar(name="machine opens", x=hourly["hour"], y=hourly["machine_opens"],
               marker_color=MACHINE),
    ])
    fig.update_layout(barmode="stack", xaxis=dict(title="hour", dtick=2), height=300)
    return chart(chart_id, "Counted opens by hour of day", fig)

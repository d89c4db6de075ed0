"""Plotly figures of a deployment's monitoring page, built from
``selectors_serving.deployment_timeseries`` rows (same conventions as ``projects.charts``:
plain JSON-ready figure dicts, None when there is nothing to draw)."""
from __future__ import annotations

from projects.charts import _fig

ROUTE_COLOURS = {"student": "#1f77b4", "teacher": "#6b4fbb", "fallback": "#d62728", "shadow": "#2ca02c"}


def _by_route(rows: list[dict], key: str, routes=("student", "teacher", "fallback")) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r["route"] in routes and r.get(key) is not None:
            xs, ys = out.setdefault(r["route"], ([], []))
            xs.append(r["t"])
            ys.append(r[key])
    return out


def _lines(title: str, ytitle: str, series: dict, *, dash: str | None = None, yrange=None, xrange=None):
    import plotly.graph_objects as go

    if not series:
        return None
    fig = go.Figure()
    for name, (xs, ys) in series.items():
        route = name.split(" ")[0]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name,
                                 line=dict(color=ROUTE_COLOURS.get(route), dash="dot" if name.endswith("p95") else dash)))
    fig.update_layout(title=title, yaxis_title=ytitle, margin=dict(t=40, b=40, l=60, r=10), height=300)
    if yrange:
        fig.update_yaxes(range=yrange)
    if xrange:
        # The whole window on the time axis: with one bucket of traffic, plotly's own range would
        # span a millisecond around it.
        fig.update_xaxes(range=[x.isoformat() for x in xrange])
    return _fig(fig)


def deployment_figures(*, series: dict) -> dict:
    """``{agreement, fallback_rate, latency, cost, traffic}`` figures (None where empty) over
    time: live agreement from shadow comparisons (fraction), fallback rate (fallback /
    student-routed requests), latency p50/p95 per route (ms), cost per 1K requests per route
    (USD), requests per bucket per route."""
    rows = series["rows"]
    x = (series["start"], series["end"]) if series.get("start") and series.get("end") else None
    agreement = _by_route(rows, "agreement", routes=("shadow",))
    buckets: dict = {}
    for r in rows:
        b = buckets.setdefault(r["t"], {"student": 0, "fallback": 0})
        if r["route"] in b:
            b[r["route"]] += r["n"]
    fb = {t: v["fallback"] / (v["student"] + v["fallback"]) for t, v in sorted(buckets.items())
          if v["student"] + v["fallback"]}
    latency = {}
    for route, (xs, ys) in _by_route(rows, "p50").items():
        latency[f"{route} p50"] = (xs, ys)
    for route, (xs, ys) in _by_route(rows, "p95").items():
        latency[f"{route} p95"] = (xs, ys)
    return {
        "agreement": _lines("Live agreement (shadow)", "agreement", {"shadow": agreement["shadow"]}
                            if "shadow" in agreement else {}, yrange=[0, 1.05], xrange=x),
        "fallback_rate": _lines("Fallback rate", "fallback / student-routed",
                                {"fallback": (list(fb), list(fb.values()))} if fb else {}, yrange=[0, 1.05], xrange=x),
        "latency": _lines("Latency at the gateway", "ms", latency, xrange=x),
        "cost": _lines("Cost per 1K requests", "USD per 1,000", _by_route(rows, "cost_per_1k"), xrange=x),
        "traffic": _lines(f"Requests per {series['bucket']}", "requests",
                          _by_route(rows, "n", routes=("student", "teacher", "fallback", "shadow")), xrange=x),
    }

"""Plotly figures built in Python from database rows; pages draw them with plotly.js (served
offline). Each function returns a plain JSON-ready figure dict ``{"data": [...], "layout": {...}}``
or None when there is nothing to draw. Areas keep their functions under their own heading."""
from __future__ import annotations

import json


def _fig(fig) -> dict:
    """A plotly Figure as plain JSON (numpy arrays and dates made JSON-safe)."""
    return json.loads(fig.to_json())


# --- Evaluation -------------------------------------------------------------------------------

ROLE_COLOURS = {"teacher": "#6b4fbb", "student": "#1f77b4", "base": "#999999"}


def eval_quality_by_model(*, results, metric: str) -> dict | None:
    """Bar chart: each model's quality (the headline ``metric``), coloured by role."""
    import plotly.graph_objects as go

    rows = [r for r in results if r.quality is not None]
    if not rows:
        return None
    fig = go.Figure(go.Bar(x=[r.model_name for r in rows], y=[r.quality for r in rows],
                           marker_color=[ROLE_COLOURS.get(r.role, "#1f77b4") for r in rows],
                           text=[f"{r.quality:.3f}" for r in rows], textposition="auto"))
    fig.update_layout(title=f"Quality by model ({metric})", yaxis_title=metric, yaxis_range=[0, max(1.0, max(r.quality for r in rows))],
                      margin=dict(t=40, b=80, l=50, r=10), height=340)
    return _fig(fig)


def eval_quality_vs_cost(*, results, metric: str) -> dict | None:
    """Scatter: quality against cost per 1,000 queries (USD, log axis), one point per model."""
    import plotly.graph_objects as go

    rows = [r for r in results if r.quality is not None and r.cost_per_1k_usd is not None]
    if not rows:
        return None
    fig = go.Figure()
    for role in ("teacher", "student", "base"):
        sel = [r for r in rows if r.role == role]
        if sel:
            fig.add_trace(go.Scatter(x=[max(r.cost_per_1k_usd, 1e-9) for r in sel], y=[r.quality for r in sel],
                                     mode="markers+text", name=role, text=[r.model_name for r in sel],
                                     textposition="top center", marker=dict(size=12, color=ROLE_COLOURS[role])))
    fig.update_layout(title="Quality against cost per 1K queries", xaxis_title="USD per 1,000 queries",
                      xaxis_type="log", yaxis_title=metric, margin=dict(t=40, b=50, l=50, r=10), height=340)
    return _fig(fig)


def eval_latency_distributions(*, latencies: dict[str, list[float]]) -> dict | None:
    """Box plots of per-query latency (ms) by model; ``latencies``: ``{model: [ms, ...]}``."""
    import plotly.graph_objects as go

    latencies = {k: v for k, v in latencies.items() if v}
    if not latencies:
        return None
    fig = go.Figure([go.Box(y=v, name=k, boxpoints="all", jitter=0.3) for k, v in latencies.items()])
    fig.update_layout(title="Latency per query", yaxis_title="ms", yaxis_type="log", showlegend=False,
                      margin=dict(t=40, b=80, l=50, r=10), height=340)
    return _fig(fig)


def eval_confusion_matrix(*, confusion: dict, model: str) -> dict | None:
    """Heatmap of a confusion matrix ``{"labels": [...], "matrix": [[count]]}`` (rows: reference,
    columns: predicted)."""
    import plotly.graph_objects as go

    if not confusion or not confusion.get("labels"):
        return None
    labels = confusion["labels"]
    fig = go.Figure(go.Heatmap(z=confusion["matrix"], x=labels, y=labels, colorscale="Blues",
                               text=confusion["matrix"], texttemplate="%{text}", hovertemplate="reference %{y}<br>predicted %{x}<br>%{z}<extra></extra>"))
    fig.update_layout(title=f"Confusion matrix: {model}", xaxis_title="predicted", yaxis_title="reference",
                      yaxis_autorange="reversed", margin=dict(t=40, b=80, l=120, r=10), height=380)
    return _fig(fig)


def eval_training_loss(*, runs) -> dict | None:
    """Loss curves (train and validation) of the training runs, from TrainingMetric rows."""
    import plotly.graph_objects as go

    from projects.models import TrainingMetric

    fig = go.Figure()
    for run in runs:
        for split in ("train", "validation"):
            pts = list(TrainingMetric.objects.filter(run=run, split=split, loss__isnull=False)
                       .order_by("step").values_list("step", "loss"))
            if pts:
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines",
                                         name=f"run {run.pk} {split}"))
    if not fig.data:
        return None
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss",
                      margin=dict(t=40, b=50, l=50, r=10), height=320)
    return _fig(fig)


def eval_history(*, project, split: str, current=None) -> dict | None:
    """Best student quality retention of each finished evaluation of ``split`` over time (and per
    training run as hover text): is distillation getting better across runs?"""
    import plotly.graph_objects as go

    from projects.models import Evaluation

    evs = list(Evaluation.objects.filter(project=project, split=split, status="succeeded").order_by("created_at"))
    if current is not None and all(e.pk != current.pk for e in evs):
        evs.append(current)  # the evaluation being finished now
    pts = [(e, e.summary.get("retention"), e.summary.get("best_student")) for e in evs if e.summary.get("retention") is not None]
    if not pts:
        return None
    fig = go.Figure(go.Scatter(x=[e.created_at.isoformat() for e, _, _ in pts], y=[r for _, r, _ in pts],
                               mode="lines+markers", text=[f"evaluation {e.pk}: {b}" for e, _, b in pts],
                               name="retention"))
    fig.add_hline(y=0.95, line_dash="dot", annotation_text="ready to ship (95 %)")
    fig.update_layout(title=f"Quality retention across evaluations ({split})", yaxis_title="student / teacher",
                      margin=dict(t=40, b=50, l=50, r=10), height=320)
    return _fig(fig)


# --- Training -------------------------------------------------------------------------------


def _finite(v):
    import math

    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def training_loss_figure(metrics: list[dict]) -> dict:
    """The loss curves of a training run: train loss per logged step and validation loss per
    evaluation (left axis, nats per supervised token or the KD loss), student-teacher fidelity
    on validation (right axis, fraction 0-1). ``metrics``: dicts with ``split``, ``step``,
    ``loss``, ``fidelity`` (``selectors.training_metrics``)."""
    import plotly.graph_objects as go

    train = [m for m in metrics if m["split"] == "train" and _finite(m.get("loss")) is not None]
    val = [m for m in metrics if m["split"] == "validation" and _finite(m.get("loss")) is not None]
    fid = [m for m in metrics if m["split"] == "validation" and _finite(m.get("fidelity")) is not None]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[m["step"] for m in train], y=[m["loss"] for m in train], mode="lines+markers",
                             name="train loss"))
    fig.add_trace(go.Scatter(x=[m["step"] for m in val], y=[m["loss"] for m in val], mode="lines+markers",
                             name="validation loss"))
    if fid:
        fig.add_trace(go.Scatter(x=[m["step"] for m in fid], y=[m["fidelity"] for m in fid], mode="lines+markers",
                                 name="fidelity (validation)", yaxis="y2", line={"dash": "dot"}))
    fig.update_layout(
        height=340, margin={"l": 50, "r": 50, "t": 30, "b": 40}, template="plotly_white",
        xaxis={"title": {"text": "step"}}, yaxis={"title": {"text": "loss"}},
        yaxis2={"title": {"text": "fidelity"}, "overlaying": "y", "side": "right", "range": [0, 1]},
        legend={"orientation": "h", "y": -0.2},
    )
    return _fig(fig)


# --- Sweeps -----------------------------------------------------------------------------------


def sweep_figures(*, trials: list[dict], params: list[str]) -> dict:
    """``{"objective": ..., "parallel": ...}`` for a sweep's trials (``selectors.sweep_trials``
    rows): the best validation loss per trial (the best trial highlighted, pruned and failed
    trials marked at zero height with their state), and parallel coordinates of the swept
    hyperparameters against validation loss and fidelity for the completed trials. Empty when
    no trial has a value yet."""
    import plotly.graph_objects as go

    out: dict = {}
    done = [t for t in trials if t["value"] is not None]
    if not trials:
        return out
    colours = ["#d62728" if t["best"] else ("#1f77b4" if t["value"] is not None else "#bbbbbb") for t in trials]
    fig = go.Figure(go.Bar(
        x=[f"trial {t['trial']}" for t in trials], y=[t["value"] or 0 for t in trials], marker_color=colours,
        text=[f"{t['value']:.4f}" if t["value"] is not None else t["state"].lower() for t in trials],
        textposition="auto",
        hovertext=[", ".join(f"{k}={v}" for k, v in t["params"].items()) for t in trials]))
    fig.update_layout(title="Best validation loss per trial (lower is better; best in red)",
                      yaxis_title="validation loss", margin=dict(t=40, b=50, l=60, r=10), height=320)
    out["objective"] = _fig(fig)
    if len(done) >= 2:
        dims = []
        for p in params:
            vals = [t["params"].get(p) for t in done]
            if all(isinstance(v, (int, float)) for v in vals):
                dims.append(dict(label=p, values=vals))
            else:  # a text choice: its position in the list of choices seen
                keys = sorted({str(v) for v in vals})
                dims.append(dict(label=p, values=[keys.index(str(v)) for v in vals],
                                 tickvals=list(range(len(keys))), ticktext=keys))
        dims.append(dict(label="validation loss", values=[t["value"] for t in done]))
        if all(t["fidelity"] is not None for t in done):
            dims.append(dict(label="fidelity", values=[t["fidelity"] for t in done], range=[0, 1]))
        fig = go.Figure(go.Parcoords(line=dict(color=[t["value"] for t in done], colorscale="Viridis_r"),
                                     dimensions=dims))
        fig.update_layout(title="Hyperparameters, validation loss, fidelity", margin=dict(t=90, b=30, l=60, r=60),
                          height=380)
        out["parallel"] = _fig(fig)
    return out

"""Plotly figures built from plain data (DB rows turned into dicts by selectors). Each builder
returns a figure as a JSON-ready dict that the page hands to ``Plotly.react``."""
from __future__ import annotations

import math


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def training_loss_figure(metrics: list[dict]) -> dict:
    """The loss curves of a training run: train loss per logged step and validation loss per
    evaluation (left axis, nats per supervised token or the KD loss), student-teacher fidelity
    on validation (right axis, fraction 0-1). ``metrics``: dicts with ``split``, ``step``,
    ``loss``, ``fidelity``."""
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
    return fig.to_plotly_json()

"""Figure builders (matplotlib and plotly) that draw Results and measurements; they compute nothing."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import plotly.graph_objects as go

__all__ = ["bundle", "show", "image_grid", "training_curves", "latency_distribution", "tradeoff", "lines", "bars",
           "sensitivity"]


def bundle(fig: go.Figure) -> dict[str, Any]:
    """The mime bundle :func:`show` displays: plotly's JSON for JupyterLab, an HTML div for the book.

    JupyterLab renders the plotly JSON mime type itself. Jupyter Book 1 ignores that type, so the
    bundle also carries an HTML div drawn by the site's local plotly.js (no CDN: the book must
    work offline).
    """
    return {"application/vnd.plotly.v1+json": json.loads(fig.to_json()),
            "text/html": fig.to_html(include_plotlyjs=False, full_html=False)}


def show(fig: go.Figure) -> None:
    """Display a plotly figure so that it works both in JupyterLab and in the built book."""
    from IPython.display import display

    display(bundle(fig), raw=True)


def image_grid(images: np.ndarray, labels: Sequence[int], *, classes: Sequence[str], n: int = 20,
               title: str = "") -> plt.Figure:
    """A grid of the first `n` images (N, C, H, W) with their class names."""
    n = min(n, len(images))
    cols = min(10, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in zip(range(n), axes.flat):
        img = np.asarray(images[i])
        ax.imshow(img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0], cmap="gray_r")
        ax.set_title(classes[int(labels[i])], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves(histories: Mapping[str, Mapping[str, Sequence[float]]]) -> plt.Figure:
    """Train loss and validation accuracy per epoch, one line per named run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, h in histories.items():
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        ax_loss.plot(epochs, h["train_loss"], label=name)
        ax_acc.plot(epochs, h["val_acc"], label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def latency_distribution(samples: Mapping[str, np.ndarray], *, title: str = "Latency of one call") -> go.Figure:
    """Overlaid histograms of per-call latencies (microseconds), with each series' p50 and p99 in the legend."""
    fig = go.Figure()
    for name, t in samples.items():
        p50, p99 = np.percentile(t, [50, 99])
        fig.add_trace(go.Histogram(x=t, name=f"{name} (p50 {p50:.0f} us, p99 {p99:.0f} us)", opacity=0.6,
                                   nbinsx=60))
    # A few calls interrupted by the OS can be 100x the median; drawn to scale they squeeze
    # every bar into one pixel. Cut the axis just past the largest p99 and say so.
    limit = 1.5 * max(float(np.percentile(t, 99)) for t in samples.values())
    fig.update_layout(barmode="overlay", title=title, yaxis_title="calls", height=380,
                      xaxis=dict(title=f"microseconds per call (axis cut at {limit:.0f} us)", range=[0, limit]),
                      legend=dict(orientation="h", y=-0.3))
    return fig


def tradeoff(rows: Sequence[Mapping[str, float | str]], *, x: str, y: str, label: str,
             size: str | None = None, log_x: bool = True, title: str = "") -> go.Figure:
    """A scatter of one point per row (e.g. ``Result.summary()``): `x` vs `y`, labelled by `label`."""
    fig = go.Figure(go.Scatter(
        x=[r[x] for r in rows], y=[r[y] for r in rows], text=[str(r[label]) for r in rows],
        mode="markers+text", textposition="top center",
        marker=dict(size=[12 + 18 * np.sqrt(float(r[size]) / max(float(q[size]) for q in rows)) for r in rows]
                    if size else 12),
        hovertemplate=f"%{{text}}<br>{x}: %{{x}}<br>{y}: %{{y}}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=420)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, x_title: str, y_title: str,
          title: str = "", reference: tuple[str, float] | None = None, height: int = 420) -> go.Figure:
    """One line with markers per named series of (x, y); an optional horizontal reference line."""
    fig = go.Figure()
    for name, (xs, ys) in series.items():
        fig.add_trace(go.Scatter(x=list(xs), y=list(ys), mode="lines+markers", name=name))
    if reference is not None:
        label, value = reference
        fig.add_hline(y=value, line_dash="dash", line_color="gray", annotation_text=label,
                      annotation_position="bottom left")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=height,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def bars(categories: Sequence[str], series: Mapping[str, Sequence[float]], *, y_title: str, title: str = "",
         log_y: bool = False, height: int = 400) -> go.Figure:
    """Grouped bars: one group per category, one bar per named series."""
    fig = go.Figure([go.Bar(name=name, x=list(categories), y=list(values), text=[f"{v:.3g}" for v in values],
                            textposition="outside") for name, values in series.items()])
    fig.update_layout(barmode="group", title=title, yaxis_title=y_title, height=height,
                      legend=dict(orientation="h", y=-0.2))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def sensitivity(amounts: Sequence[float], accuracy: Mapping[str, Sequence[float]], *,
                base_accuracy: float) -> plt.Figure:
    """Accuracy per layer as that layer alone is pruned (a ``prune.SensitivityScan``'s fields)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, accs in accuracy.items():
        ax.plot([100 * a for a in amounts], accs, marker="o", label=name)
    ax.axhline(base_accuracy, color="gray", ls="--", lw=1, label="unpruned")
    ax.set(xlabel="weights removed from this layer only (%)", ylabel="validation accuracy",
           title="Sensitivity of each layer to magnitude pruning (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

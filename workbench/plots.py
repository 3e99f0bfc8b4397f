"""Figure builders (matplotlib and plotly) that draw Results and measurements; they compute nothing."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["bundle", "show", "image_grid", "training_curves", "latency_distribution", "tradeoff", "lines", "bars",
           "sensitivity", "slider_figure", "step_traces", "trace_state", "STEP_ATTRS"]

# The trace attributes a slider step of :func:`slider_figure` sets (those any step's traces use).
STEP_ATTRS = ("x", "y", "z", "text", "name", "width", "marker.color", "marker.size", "marker.symbol")


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


def _short(v: float) -> str:
    """A bar label: whole numbers from 100 up (no "1.04e+03"), three significant digits below."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def bars(categories: Sequence[str], series: Mapping[str, Sequence[float]], *, y_title: str, title: str = "",
         log_y: bool = False, height: int = 400) -> go.Figure:
    """Grouped bars: one group per category, one bar per named series, each bar labelled with its value.

    With more than three series the bars are narrow: their labels are written vertically, and a
    label that still does not fit is hidden (the value stays in the hover label), so labels never
    overlap their neighbours.
    """
    many = len(series) > 3
    fig = go.Figure([go.Bar(name=name, x=list(categories), y=list(values), text=[_short(v) for v in values],
                            textposition="outside", textangle=-90 if many else 0, cliponaxis=False,
                            hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra></extra>")
                     for name, values in series.items()])
    fig.update_layout(barmode="group", title=title, height=height, legend=dict(orientation="h", y=-0.2),
                      uniformtext=dict(minsize=9, mode="hide"),
                      yaxis=dict(title=y_title, automargin=True))
    if not log_y:  # room above the tallest bar for its (vertical) label
        top = max((max(v) for v in series.values() if len(v)), default=0)
        fig.update_yaxes(range=[0, top * (1.35 if many else 1.15)])
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


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of one trace attribute (arrays and tuples become lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def trace_state(traces: Sequence[Any], attrs: Sequence[str] = STEP_ATTRS) -> list[dict[str, Any]]:
    """The `attrs` of each plotly trace as plain lists and numbers: what a slider step stores."""
    return [{a: _plain(_get(t, a)) for a in attrs} for t in traces]


def _get(trace: Any, attr: str) -> Any:
    try:
        return trace[attr]
    except KeyError:  # not an attribute of this trace type (e.g. marker.symbol of a bar)
        return None


def slider_figure(steps: Sequence[tuple[str, str, Sequence[go.Figure]]], *, rows: Sequence[int] | None = None,
                  prefix: str = "", active: int = 0, row_height: int = 330) -> go.Figure:
    """A figure that works with no kernel: a slider steps through precomputed states of a set of panels.

    Each step is ``(label, title, panels)``: the slider label, the figure title at that step (state
    its numbers there) and the panel figures as drawn for that step. Every step must have the same
    panels with the same traces in the same order (one figure builder drew them all); the slider
    step then restyles every trace (the attributes of :data:`STEP_ATTRS` that are used) and
    relayouts the title and each panel's title (a subplot title). The panels are laid out in
    `rows` (panels per row; a row of one panel spans the width; default: all in one row). A panel
    with a second y axis (``yaxis2``) keeps it.

    Args:
        steps: the precomputed states, in slider order.
        rows: panels per row, e.g. ``(2, 1)``.
        prefix: shown before the current step's label.
        active: the step shown first.
        row_height: pixels per row of panels.

    Returns:
        The figure; :func:`step_traces` reads back what one step shows.

    Example:
        >>> fig = slider_figure([("2", "T = 2", [fig2]), ("4", "T = 4", [fig4])], prefix="T = ")
    """
    if not steps:
        raise ValueError("slider_figure needs at least one step")
    label0, title0, panels0 = steps[active]
    n = len(panels0)
    rows = tuple(rows) if rows is not None else (n,)
    cols = max(rows)
    if sum(rows) != n or any(k not in (1, cols) for k in rows):
        raise ValueError(f"rows {rows} must place the {n} panels, each row holding 1 or {cols} of them")
    secondary = ["yaxis2" in p.layout.to_plotly_json() for p in panels0]
    specs, cells, i = [], [], 0
    for r, k in enumerate(rows, start=1):
        if k == 1:
            specs.append([{"colspan": cols, "secondary_y": secondary[i]}] + [None] * (cols - 1))
            cells.append((r, 1))
            i += 1
        else:
            specs.append([{"secondary_y": secondary[i + c]} for c in range(cols)])
            cells += [(r, c + 1) for c in range(cols)]
            i += cols
    # Subplot titles are annotations, one per non-empty title: a blank placeholder keeps one per panel.
    fig = make_subplots(rows=len(rows), cols=cols, specs=specs, horizontal_spacing=0.14,
                        vertical_spacing=0.6 / (len(rows) + 1) if len(rows) > 1 else 0.1,
                        subplot_titles=[p.layout.title.text or " " for p in panels0])
    named: set[str] = set()
    for p, (r, c), sec in zip(panels0, cells, secondary):
        for trace in p.data:
            fig.add_trace(trace, row=r, col=c, secondary_y=sec and trace.yaxis == "y2")
            # No legend entry for a panel's only, unnamed trace ("trace 3" helps no one), for a panel
            # drawn without a legend, or twice for the same name (two panels of the same traces).
            if not trace.name or p.layout.showlegend is False or trace.name in named:
                fig.data[-1].showlegend = False
            named.add(trace.name)
        lay = p.layout.to_plotly_json()
        for axis, update, extra in (("xaxis", fig.update_xaxes, {}), ("yaxis", fig.update_yaxes, {}),
                                    ("yaxis2", fig.update_yaxes, {"secondary_y": True})):
            props = {k: v for k, v in lay.get(axis, {}).items() if k not in ("domain", "anchor", "overlaying", "side")}
            if props and (axis != "yaxis2" or sec):
                update(props, row=r, col=c, **({"secondary_y": False} if sec and axis == "yaxis" else extra))
    for key in ("barmode", "bargap"):
        value = next((p.layout[key] for p in panels0 if p.layout[key] is not None), None)
        if value is not None:
            fig.layout[key] = value

    traces = [[t for p in panels for t in p.data] for _, _, panels in steps]
    if any(len(ts) != len(traces[0]) for ts in traces):
        raise ValueError("every step must draw the same number of traces")
    attrs = [a for a in STEP_ATTRS if any(_get(t, a) is not None for ts in traces for t in ts)]
    slider_steps = []
    for (label, title, panels), ts in zip(steps, traces):
        state = trace_state(ts, attrs)
        restyle = {a: [s[a] for s in state] for a in attrs}
        relayout = {"title.text": title} | {f"annotations[{j}].text": p.layout.title.text or " "
                                             for j, p in enumerate(panels)}
        slider_steps.append(dict(method="update", label=label, args=[restyle, relayout]))
    # Below the panels (in pixels): the axis titles, the legend (about three entries a row), the slider.
    plot_h = row_height * len(rows)
    entries = sum(1 for t in fig.data if t.showlegend is not False)
    slider_at = 65 + 24 * -(-entries // 3) + 20
    fig.update_layout(
        title=dict(text=title0, font=dict(size=14)), height=plot_h + 110 + slider_at + 100,
        margin=dict(t=110, b=slider_at + 100, l=70, r=40),
        legend=dict(orientation="h", x=0, y=-65 / plot_h, yanchor="top"),
        sliders=[dict(active=active, steps=slider_steps, currentvalue=dict(prefix=prefix),
                      x=0.02, len=0.94, y=-slider_at / plot_h, yanchor="top", pad=dict(t=0))])
    fig.update_annotations(font_size=12)
    return fig


def step_traces(fig: go.Figure, step: int) -> list[dict[str, Any]]:
    """What slider step `step` of a :func:`slider_figure` draws: one dict of attributes per trace."""
    restyle = fig.layout.sliders[0].steps[step].args[0]
    return [{a: values[i] for a, values in restyle.items()} for i in range(len(fig.data))]

"""The trade-off explorer (chapter 8): model (as given or a distilled student) x pruning ratio x bit-width
-> accuracy vs latency vs size, from a cached sweep."""

from __future__ import annotations

import html
import itertools
import os
import time
from typing import Any, Iterable

import ipywidgets
import plotly.graph_objects as go

from ..errors import WorkbenchError
from ..recipe import Recipe, Result, run, sweep
from ._render import render
from ._static import StaticTwin, product

__all__ = ["TradeoffExplorer", "BITS", "point", "pareto", "static_figure"]

# 32: float ONNX; 8: ONNX Runtime int8 (auto: static QDQ for convolutions, dynamic otherwise), a
# real int8 model with a real latency; 4: fake-quantized weights, packed size only (no int4
# kernels on CPUs, so its latency is the float model's).
BITS = (32, 8, 4)


def recipe_for(base: Recipe, amount: float, bits: int, *, finetune_epochs: int = 2) -> Recipe:
    """The Recipe of one grid point: structured pruning of `amount` of the channels, then `bits`."""
    if bits not in BITS:
        raise WorkbenchError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    r = base.dense()
    amount = round(float(amount), 4)
    if amount:
        r = r.replace(prune_amount=amount, prune_kind="structured", finetune_epochs=finetune_epochs)
    if bits == 8:
        r = r.replace(ort_quant="auto")
    elif bits == 4:
        r = r.replace(weight_bits=4, act_bits=8, export_onnx=False)
    return r


def point(result: Result, float_result: Result | None = None, *, student: bool | None = None) -> dict[str, Any]:
    """One grid point's numbers: accuracy, size (KB) and ORT batch-1 latency (us).

    `student` marks a distilled student's point (default: whether the recipe has a teacher).
    """
    r = result.recipe
    bits = 8 if r.ort_quant != "none" else (r.weight_bits or 32)
    size = result.size_quantized_bytes if bits < 8 else result.size_onnx_bytes
    lat = result.latency_ort_b1 or (float_result.latency_ort_b1 if float_result else None)
    student = r.teacher is not None if student is None else student
    return {"prune": r.prune_amount, "bits": bits, "student": student, "accuracy": result.accuracy,
            "size_kb": size / 1024, "latency_us": lat.p50_us if lat else float("nan"),
            "label": (f"{'distilled ' + r.model if student else r.model}, {r.prune_amount:.0%} pruned, "
                      f"{'fp32' if bits == 32 else f'int{bits}'}")}


def pareto(points: list[dict[str, Any]], x: str = "latency_us") -> list[dict[str, Any]]:
    """The points no other point beats on both `x` (lower) and accuracy (higher), sorted by `x`."""
    front = [p for p in points if not any(q[x] <= p[x] and q["accuracy"] >= p["accuracy"]
                                          and (q[x] < p[x] or q["accuracy"] > p["accuracy"]) for q in points)]
    return sorted(front, key=lambda p: p[x])


def _scatter_traces(points: list[dict[str, Any]], current: dict[str, Any] | None, x: str) -> list[go.Scatter]:
    front = pareto(points, x)
    return [
        go.Scatter(x=[p[x] for p in points], y=[p["accuracy"] for p in points], mode="markers",
                   text=[p["label"] for p in points], name="computed",
                   marker=dict(size=[8 + 4 * (32 // p["bits"]) ** 0.5 for p in points],
                               color=[p["prune"] for p in points], colorscale="Viridis", cmin=0, cmax=1,
                               symbol=["diamond" if p["student"] else "circle" for p in points],
                               colorbar=dict(title="pruned")),
                   hovertemplate="%{text}<br>%{x:.1f}<br>accuracy %{y:.2%}<extra></extra>"),
        go.Scatter(x=[p[x] for p in front], y=[p["accuracy"] for p in front], mode="lines",
                   name="Pareto front", line=dict(dash="dash", color="gray")),
        go.Scatter(x=[current[x]] if current else [], y=[current["accuracy"]] if current else [], mode="markers",
                   name="current", marker=dict(size=18, symbol="star", color="crimson")),
    ]


class TradeoffExplorer(StaticTwin):
    """Sliders over pruning ratio x bit-width driving Pareto plots of accuracy vs latency and vs size.

    Args:
        base: the dense recipe (a model with convolutions: structured pruning removes channels).
        cache: the result cache folder.
        amounts: the pruning ratios of the slider.
        finetune_epochs: fine-tuning after pruning.
        student: a smaller model's recipe; when given, a toggle adds it distilled from `base`
            (its ``teacher`` is set to `base`), pruned and quantized on the same grid. Its points
            are diamonds.

    Example:
        >>> ex = TradeoffExplorer(Recipe(model="cnn", epochs=30)); ex.precompute(); ex
        >>> plots.show(ex.static_figure())  # every grid point behind a slider, for the site
    """

    CONTROLS = ("model", "ratio", "bits")
    PANELS = (("latency_plot", "size_plot"),)
    PREFIX = ""

    def __init__(self, base: Recipe, *, cache: str | os.PathLike | None = None,
                 amounts: Iterable[float] = (0.0, 0.25, 0.5, 0.75), finetune_epochs: int = 2,
                 student: Recipe | None = None) -> None:
        if not isinstance(base, Recipe):
            raise WorkbenchError(f"TradeoffExplorer needs a workbench Recipe, got {type(base).__name__}")
        self.base, self.cache, self.finetune_epochs = base.dense(), cache, finetune_epochs
        if student is not None and not isinstance(student, Recipe):
            raise WorkbenchError(f"student must be a workbench Recipe, got {type(student).__name__}")
        # Recipe validation checks the pair (same dataset, a real temperature) here, not at the first click.
        # Measured in ONNX Runtime like every grid point (export_onnx on).
        self.student = student.dense().replace(teacher=self.base, export_onnx=True) if student is not None else None
        self.models = {"as given": self.base} | ({"distilled student": self.student} if self.student else {})
        self.amounts = tuple(sorted(set(round(float(a), 4) for a in amounts)))
        if not self.amounts or not all(0 <= a < 1 for a in self.amounts):
            raise WorkbenchError(f"amounts must be fractions in [0, 1), got {amounts!r}")
        self.results: dict[Recipe, Result] = {}
        self.last_seconds = 0.0
        self.headline = ""
        self.ratio = ipywidgets.SelectionSlider(options=[(f"{a:.0%}", a) for a in self.amounts],
                                                value=self.amounts[0], description="prune", continuous_update=False)
        self.bits = ipywidgets.ToggleButtons(options=BITS, value=32, description="bits")
        self.model = ipywidgets.ToggleButtons(options=list(self.models), value="as given", description="model",
                                              layout=ipywidgets.Layout(display="flex" if self.student else "none"))
        self.info = ipywidgets.HTML()
        self.latency_plot = go.Figure(_scatter_traces([], None, "latency_us"))
        self.latency_plot.update_layout(title="Accuracy vs ORT latency (batch 1)", height=360, width=480,
                                        xaxis_title="p50 latency (us)", yaxis=dict(title="test accuracy", tickformat=".0%"),
                                        margin=dict(l=60, r=20, t=50, b=50), showlegend=False)
        self.size_plot = go.Figure(_scatter_traces([], None, "size_kb"))
        self.size_plot.update_layout(title="Accuracy vs size", height=360, width=480, xaxis=dict(title="KB", type="log"),
                                     yaxis=dict(title="test accuracy", tickformat=".0%"),
                                     margin=dict(l=60, r=20, t=50, b=50), showlegend=False)
        self._outputs = {name: ipywidgets.Output() for name in ("latency_plot", "size_plot")}
        self.widget = ipywidgets.VBox([ipywidgets.HBox([self.ratio, self.bits]), self.model, self.info,
                                       ipywidgets.HBox([self._outputs["latency_plot"], self._outputs["size_plot"]])])
        for control in (self.ratio, self.bits, self.model):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def recipe(self) -> Recipe:
        """The recipe of the current control values."""
        return recipe_for(self.models[self.model.value], self.ratio.value, self.bits.value,
                          finetune_epochs=self.finetune_epochs)

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer: models x pruning ratios x bit-widths (bits varying fastest)."""
        return product(model=list(self.models), ratio=self.amounts, bits=BITS)

    def needs(self, setting: Any) -> list[Recipe]:
        m, a, b = self.models[setting["model"]], setting["ratio"], setting["bits"]
        float_twin = [recipe_for(m, a, 32, finetune_epochs=self.finetune_epochs)] if b == 4 else []
        return [recipe_for(m, a, b, finetune_epochs=self.finetune_epochs)] + float_twin

    def label(self, setting: Any) -> str:
        bits = "fp32" if setting["bits"] == 32 else f"int{setting['bits']}"
        return ("KD " if setting["model"] != "as given" else "") + f"{setting['ratio']:.0%} {bits}"

    def _run(self, recipe: Recipe) -> Result:
        if recipe not in self.results:
            self.results[recipe] = run(recipe, cache=self.cache, progress=False)
        return self.results[recipe]

    def points(self) -> list[dict[str, Any]]:
        """Every computed grid point (4-bit points take the latency of their float model when known)."""
        out = []
        for r, res in self.results.items():
            twin = self.results.get(r.replace(weight_bits=0, act_bits=0, export_onnx=True)) if r.weight_bits else None
            out.append(point(res, twin, student=self.student is not None and r.teacher == self.base))
        return out

    def update(self, change: Any = None) -> Result | None:
        """Run (or fetch) the current point and redraw both Pareto plots."""
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        t0 = time.perf_counter()
        try:
            result = self._run(self.recipe())
            if self.bits.value == 4:
                self._run(recipe_for(self.models[self.model.value], self.ratio.value, 32,
                                     finetune_epochs=self.finetune_epochs))
        except WorkbenchError as exc:
            self.info.value = f'<p style="color:#c62828"><b>Cannot run this setting:</b> {html.escape(str(exc))}</p>'
            self.headline = f"cannot run this setting: {exc}"
            self.last_seconds = time.perf_counter() - t0
            return None
        points = self.points()
        current = next(p for p, res in zip(points, self.results.values()) if res is result)
        for fig, x in ((self.latency_plot, "latency_us"), (self.size_plot, "size_kb")):
            new = _scatter_traces(points, current, x)
            with fig.batch_update():
                for trace, src in zip(fig.data, new):
                    trace.x, trace.y = src.x, src.y
                    if src.text is not None:
                        trace.text = src.text
                    if src.marker is not None and src.marker.size is not None:
                        trace.marker.size, trace.marker.color = src.marker.size, src.marker.color
                        trace.marker.symbol = src.marker.symbol
        note = " (no int4 kernels: latency of the float model)" if self.bits.value == 4 else ""
        self.info.value = (f"<b>{html.escape(current['label'])}</b>: test accuracy {current['accuracy']:.2%}, "
                           f"{current['size_kb']:.1f} KB, ORT p50 {current['latency_us']:.1f} us{note}"
                           + (" &middot; from the cache" if result.cached else ""))
        self.headline = (f"{current['label']}: test accuracy {current['accuracy']:.2%}, {current['size_kb']:.1f} KB, "
                         f"ORT p50 {current['latency_us']:.1f} us{note}")
        if not self._quiet:
            render(self._outputs, self)
        self.last_seconds = time.perf_counter() - t0
        return result

    def precompute(self, bits: Iterable[int] = BITS) -> list[Result]:
        """Fill the cache with the whole grid (models x amounts x bits) through :func:`workbench.recipe.sweep`."""
        recipes = [recipe_for(m, a, b, finetune_epochs=self.finetune_epochs)
                   for m, b, a in itertools.product(self.models.values(), bits, self.amounts)]
        results = sweep(recipes, cache=self.cache, progress=False)
        self.results.update(zip(recipes, results))
        self.update()
        return results


def static_figure(explorer: TradeoffExplorer) -> go.Figure:
    """The explorer's static twin (:meth:`TradeoffExplorer.static_figure`): one slider step per computed grid point."""
    return explorer.static_figure()

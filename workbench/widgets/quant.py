"""The quantization explorer (chapter 4): bits, symmetry, granularity, calibration, QAT -> accuracy, SQNR, grid."""

from __future__ import annotations

import dataclasses
import html
import itertools
import math
import os
import time
from typing import Any, Iterable

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import torch

from .. import quant
from ..errors import WorkbenchError
from ..recipe import Recipe, Result, run, sweep
from ._render import render
from ._static import StaticTwin, product

__all__ = ["QuantizationExplorer", "BITS"]

# The grid the controls offer (and the static twin steps through), besides quant.GRANULARITIES,
# quant.CALIBRATIONS, symmetric/asymmetric, int8/float activations and 0..max_qat_epochs of QAT.
BITS = tuple(range(1, 9))  # weight bits; 1-bit symmetric is impossible (no level but 0 and -1)
_FLOAT = 0  # act_bits value meaning "activations stay float"
_HIST_BINS = 80
_SETTINGS = ("symmetric", "granularity", "calibration", "act_bits", "qat")


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KB"


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The weights one set of qparams applies to, with the dequantized levels and the clipping range."""

    values: np.ndarray
    levels: np.ndarray
    lo: float
    hi: float
    label: str


def _largest_layer(model: torch.nn.Module) -> tuple[str, quant.FakeQuantLayer]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, quant.FakeQuantLayer)]
    if not layers:
        raise WorkbenchError("the model has no fake-quantized layer (is weight_bits > 0?)")
    return max(layers, key=lambda item: item[1].layer.weight.numel())


def _weight_grid(layer: quant.FakeQuantLayer) -> _Grid:
    """The quantization grid of one layer's weight, from :func:`workbench.quant.compute_qparams`.

    Per tensor: every weight of the layer and the one grid. Per channel: the output channel
    whose range is the median of the layer's (a typical one), and its grid. Per group: the
    first group of that channel.
    """
    c = layer.config
    w = layer.layer.weight.detach()
    if c.granularity == "per-tensor":
        qp = quant.compute_qparams(w, bits=c.weight_bits, symmetric=c.symmetric)
        values, one, label = w.reshape(-1), qp, f"whole layer, {w.numel():,} weights, one grid"
    else:
        # As in FakeQuantLayer.weight_qparams: a channel not divisible into groups is per-channel.
        group = c.group_size if c.granularity == "per-group" and w[0].numel() % c.group_size == 0 else None
        qp = quant.compute_qparams(w, bits=c.weight_bits, symmetric=c.symmetric, axis=0, group_size=group)
        flat = w.reshape(w.shape[0], -1)
        ranges = flat.amax(1) - flat.amin(1)
        ch = int(ranges.argsort()[len(ranges) // 2])
        if group is None:
            values, idx = flat[ch], ch
            label = f"output channel {ch} of {w.shape[0]} (median range), {values.numel()} weights, its own grid"
        else:
            values, idx = flat[ch, :group], (ch, 0)
            label = f"group 0 of output channel {ch} ({group} weights), its own grid"
        one = quant.QParams(scale=qp.scale[idx], zero_point=qp.zero_point[idx], qmin=qp.qmin, qmax=qp.qmax)
    codes = torch.arange(one.qmin, one.qmax + 1)
    levels = quant.dequantize(codes, one).numpy()
    return _Grid(values=values.numpy(), levels=levels, lo=float(levels[0]), hi=float(levels[-1]), label=label)


class QuantizationExplorer(StaticTwin):
    """ipywidgets explorer over quantization recipes (chapter 4).

    Every control change builds a :class:`Recipe` from `base` and the control values, runs it
    through :func:`workbench.recipe.run` (cached on disk; the fp32 model is trained once and every
    quantized point starts from it) and redraws: test accuracy against weight bits for every point
    computed so far with the same other settings, next to the fp32 model; the SQNR of each layer's
    weight; the histogram of the largest layer's float weights with the quantization levels and
    the clipping range drawn on it; and the measurements of the current point.

    Args:
        base: the recipe to quantize; its quantization settings give the initial control values
            (weight_bits 0 starts the slider at 8, act_bits 0 means float activations).
        cache: the result cache folder (see :func:`workbench.recipe.cache_dir`).
        max_qat_epochs: the top of the QAT slider.

    Attributes:
        base, cache: as given.
        bits, symmetric, granularity, calibration, act_bits, qat: the controls (``act_bits.value``
            is 8 or 0 for float; the calibration menu is disabled while activations are float).
        curve, layers, weights: the plotly figures.
        info: the measurements of the current point (or the error that stopped it, in red).
        widget: everything laid out; displaying the explorer displays it.
        results: every Result computed so far, by recipe.
        last_seconds: wall time of the last :meth:`update`.

    Example:
        >>> ex = QuantizationExplorer(Recipe(model="cnn", epochs=30, weight_bits=4, act_bits=8))
        >>> ex.precompute(bits=(2, 3, 4, 8))  # fill the cache so the slider answers at once
        >>> ex  # in a notebook: the widget
        >>> plots.show(ex.static_figure())  # the precomputed points behind a slider, for the site
    """

    CONTROLS = ("bits", "symmetric", "granularity", "calibration", "act_bits", "qat")
    PANELS = (("curve", "layers"), ("weights",))
    PREFIX = "weights: "

    def __init__(self, base: Recipe, *, cache: str | os.PathLike | None = None, max_qat_epochs: int = 3) -> None:
        if not isinstance(base, Recipe):
            raise WorkbenchError(f"QuantizationExplorer needs a workbench Recipe, got {type(base).__name__}")
        if isinstance(max_qat_epochs, bool) or not isinstance(max_qat_epochs, int) or max_qat_epochs < 0:
            raise WorkbenchError(f"max_qat_epochs must be an integer >= 0, got {max_qat_epochs!r}")
        self.base = base
        self.cache = cache
        self.results: dict[Recipe, Result] = {}
        self.last_seconds = 0.0
        # The float reference: the same recipe with quantization off (pruning, if any, kept).
        self._fp32_recipe = base.without("quantize")
        self._default_calibration = self._fp32_recipe.calibration
        self._fp32_bytes: dict[str, int] = {}

        self.max_qat_epochs = max_qat_epochs
        self.headline = ""
        self.bits = ipywidgets.IntSlider(value=base.weight_bits if base.weight_bits in BITS else BITS[-1],
                                         min=BITS[0], max=BITS[-1],
                                         continuous_update=False, description="weight bits",
                                         style={"description_width": "initial"})
        self.symmetric = ipywidgets.ToggleButtons(
            options=[("symmetric", True), ("asymmetric", False)], value=base.quant_symmetric, description="weights",
            tooltips=["signed codes, Z = 0", "unsigned codes, zero point Z"])
        self.granularity = ipywidgets.ToggleButtons(
            options=quant.GRANULARITIES, value=base.quant_granularity, description="scales",
            tooltips=["one scale per tensor", "one scale per output channel",
                      f"one scale per {quant.QuantConfig.group_size} weights of a channel"])
        acts = [("int8", 8), ("float", _FLOAT)]
        if base.act_bits not in (8, _FLOAT):
            acts.insert(0, (f"int{base.act_bits}", base.act_bits))
        self.act_bits = ipywidgets.ToggleButtons(options=acts, value=base.act_bits, description="activations")
        self.calibration = ipywidgets.Dropdown(options=quant.CALIBRATIONS, value=base.calibration,
                                               description="calibration", disabled=base.act_bits == _FLOAT)
        self.qat = ipywidgets.IntSlider(value=min(base.qat_epochs, max_qat_epochs), min=0, max=max_qat_epochs,
                                        continuous_update=False, description="QAT epochs",
                                        style={"description_width": "initial"})
        self.info = ipywidgets.HTML()

        self.curve = go.Figure()
        self.curve.add_scatter(x=[], y=[], mode="lines+markers", name="quantized",
                               hovertemplate="%{x}-bit weights<br>accuracy %{y:.2%}<extra></extra>")
        self.curve.add_scatter(x=[0.5, 8.5], y=[], mode="lines", name="fp32", line=dict(dash="dash", color="gray"),
                               hoverinfo="skip")
        self.curve.add_scatter(x=[], y=[], mode="markers", name="current",
                               marker=dict(size=16, symbol="star", color="crimson"))
        self.curve.update_layout(title="Test accuracy vs weight bits", height=340, width=520,
                                 margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.25),
                                 xaxis=dict(title="bits per weight", range=[0.5, 8.5], dtick=1),
                                 yaxis=dict(title="test accuracy", tickformat=".0%", range=[0, 1.05]))
        self.layers = go.Figure()
        self.layers.add_bar(x=[], y=[], texttemplate="%{y:.1f}", textposition="outside",
                            hovertemplate="%{x}: %{y:.1f} dB<extra></extra>")
        self.layers.update_layout(title="Weight SQNR per layer", height=340, width=440,
                                  margin=dict(l=60, r=20, t=50, b=50), yaxis=dict(title="SQNR (dB)"))
        self.weights = go.Figure()
        self.weights.add_bar(x=[], y=[], name="float weights", marker=dict(color="steelblue", line=dict(width=0)),
                             hovertemplate="%{x:.4f}: %{y} weights<extra></extra>")
        self.weights.add_scatter(x=[], y=[], mode="markers", name="levels S(q - Z)",
                                 marker=dict(symbol="line-ns-open", size=12, color="crimson", line=dict(width=1)),
                                 hovertemplate="level %{x:.4f}<extra></extra>")
        self.weights.add_scatter(x=[], y=[], mode="lines", name="clipping range",
                                 line=dict(dash="dash", color="black"), hoverinfo="skip")
        self.weights.update_layout(height=320, width=960, bargap=0, margin=dict(l=60, r=20, t=50, b=50),
                                   legend=dict(orientation="h", y=-0.3), xaxis_title="weight value",
                                   yaxis_title="weights")

        # Plain go.Figure objects drawn into Output widgets, not FigureWidget: see PruningExplorer.
        self._outputs = {name: ipywidgets.Output() for name in ("curve", "layers", "weights")}
        self.widget = ipywidgets.VBox([
            ipywidgets.HBox([self.bits, self.qat]),
            ipywidgets.HBox([self.symmetric, self.granularity]),
            ipywidgets.HBox([self.act_bits, self.calibration]),
            self.info,
            ipywidgets.HBox([self._outputs["curve"], self._outputs["layers"]]),
            self._outputs["weights"],
        ])
        for control in (self.bits, self.symmetric, self.granularity, self.act_bits, self.calibration, self.qat):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _recipe_for(self, bits: int, symmetric: bool, granularity: str, calibration: str, act_bits: int,
                    qat: int) -> Recipe:
        # Calibration only sets activation ranges: with float activations it is pinned to the
        # default, so that one point does not get a cache key per menu entry.
        return self.base.replace(weight_bits=bits, act_bits=act_bits, quant_symmetric=symmetric,
                                 quant_granularity=granularity, qat_epochs=qat,
                                 calibration=calibration if act_bits else self._default_calibration)

    def recipe(self) -> Recipe:
        """The recipe for the current control values.

        Raises:
            WorkbenchError: for impossible settings (1-bit symmetric weights).

        Example:
            >>> ex.bits.value = 4; ex.recipe().weight_bits
            4
        """
        return self._recipe_for(self.bits.value, self.symmetric.value, self.granularity.value,
                                self.calibration.value, self.act_bits.value, self.qat.value)

    def _run(self, recipe: Recipe) -> Result:
        result = run(recipe, cache=self.cache, progress=False)
        self.results[recipe] = result
        return result

    def _fp32(self) -> Result:
        r = self._fp32_recipe
        return self.results[r] if r in self.results else self._run(r)

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer (weight bits varying fastest, then granularity)."""
        return product(symmetric=[v for _, v in self.symmetric.options], act_bits=[v for _, v in self.act_bits.options],
                       calibration=quant.CALIBRATIONS, qat=range(self.max_qat_epochs + 1),
                       granularity=quant.GRANULARITIES, bits=BITS)

    def needs(self, setting: Any) -> list[Recipe]:
        return [self._recipe_for(setting["bits"], setting["symmetric"], setting["granularity"],
                                 setting["calibration"], setting["act_bits"], setting["qat"]), self._fp32_recipe]

    def label(self, setting: Any) -> str:
        return f"{setting['bits']} bits {setting['granularity']}"

    def update(self, change: Any = None) -> Result | None:
        """Run the current recipe (through the cache) and redraw everything.

        Returns:
            The Result, or None when the settings are impossible (a :class:`WorkbenchError`, e.g.
            1-bit symmetric weights): the message is then shown in red in `info` and the controls
            stay usable.

        Example:
            >>> res = ex.update(); res.cached
            True
        """
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        t0 = time.perf_counter()
        self.calibration.disabled = self.act_bits.value == _FLOAT
        try:
            result = self._run(self.recipe())
            fp32 = self._fp32()
        except WorkbenchError as exc:
            self.info.value = f'<p style="color:#c62828"><b>Cannot run this setting:</b> {html.escape(str(exc))}</p>'
            self.headline = f"cannot run this setting: {exc}"
            if self._fp32_recipe in self.results:
                self._draw_curve(None, self.results[self._fp32_recipe])
                self._render()
            self.last_seconds = time.perf_counter() - t0
            return None
        model = result.load_model()
        self._draw_curve(result, fp32)
        self._draw_layers(result)
        self._draw_weights(model)
        self.info.value = self._info_html(result, fp32)
        self.headline = self._headline(result, fp32)
        self._render()
        self.last_seconds = time.perf_counter() - t0
        return result

    def _render(self) -> None:
        if not self._quiet:
            render(self._outputs, self)

    def precompute(self, bits: Iterable[int] = (2, 4, 8), **settings: Any) -> list[Result]:
        """Fill the cache with a :func:`workbench.recipe.sweep` so the controls answer at once.

        Args:
            bits: weight widths to compute.
            **settings: ``symmetric``, ``granularity``, ``calibration``, ``act_bits``, ``qat``: one
                value or a list of values each (every combination is computed); the current
                control values by default. Impossible combinations (1-bit symmetric) are skipped.

        Returns:
            The Results, bits varying fastest.

        Example:
            >>> ex.precompute((2, 4), granularity=["per-tensor", "per-channel"], qat=[0, 3])
        """
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise WorkbenchError(f"unknown precompute setting(s) {', '.join(unknown)}; known: {', '.join(_SETTINGS)}")
        axes = []
        for name in _SETTINGS:
            value = settings.get(name, getattr(self, name).value)
            axes.append(list(value) if isinstance(value, (list, tuple)) else [value])
        recipes = []
        for combo in itertools.product(*axes):
            sym, gran, cal, act, qat = combo
            for b in bits:
                if sym and b == 1:
                    continue
                recipe = self._recipe_for(b, sym, gran, cal, act, qat)
                if recipe not in recipes:
                    recipes.append(recipe)
        results = sweep(recipes, cache=self.cache, progress=False)
        self.results.update(zip(recipes, results))
        self.update()
        return results

    # -- drawing: arranging Result fields, nothing measured here -----------------------------

    def _same_settings(self, r: Recipe) -> bool:
        current = (self.symmetric.value, self.granularity.value, self.act_bits.value, self.qat.value,
                   self.calibration.value if self.act_bits.value else self._default_calibration)
        return r.weight_bits > 0 and (r.quant_symmetric, r.quant_granularity, r.act_bits, r.qat_epochs,
                                      r.calibration) == current

    def _draw_curve(self, result: Result | None, fp32: Result) -> None:
        points = sorted((r.weight_bits, res.accuracy) for r, res in self.results.items() if self._same_settings(r))
        act = "float activations" if not self.act_bits.value else f"{self.act_bits.value}-bit activations"
        name = (f"{'symmetric' if self.symmetric.value else 'asymmetric'} {self.granularity.value}, {act}"
                + (f", QAT {self.qat.value}" if self.qat.value else ", PTQ"))
        with self.curve.batch_update():
            self.curve.data[0].x = [p[0] for p in points]
            self.curve.data[0].y = [p[1] for p in points]
            self.curve.data[0].name = name
            self.curve.data[1].y = [fp32.accuracy, fp32.accuracy]
            self.curve.data[1].name = f"fp32 {fp32.accuracy:.2%}"
            self.curve.data[2].x = [result.recipe.weight_bits] if result else []
            self.curve.data[2].y = [result.accuracy] if result else []

    def _draw_layers(self, result: Result) -> None:
        with self.layers.batch_update():
            self.layers.data[0].x = list(result.layer_sqnr)
            self.layers.data[0].y = list(result.layer_sqnr.values())
            self.layers.layout.title.text = f"Weight SQNR per layer, {result.recipe.weight_bits} bits"

    def _draw_weights(self, model: torch.nn.Module) -> None:
        name, layer = _largest_layer(model)
        grid = _weight_grid(layer)
        # Binned here over the data and the range together, so the range ends are on the axis.
        span = (min(float(grid.values.min()), grid.lo), max(float(grid.values.max()), grid.hi))
        counts, edges = np.histogram(grid.values, bins=_HIST_BINS, range=span)
        top = float(counts.max())
        with self.weights.batch_update():
            self.weights.data[0].x = (edges[:-1] + edges[1:]) / 2
            self.weights.data[0].y = counts
            self.weights.data[0].width = float(edges[1] - edges[0])
            self.weights.data[1].x = grid.levels
            self.weights.data[1].y = np.zeros(len(grid.levels))
            self.weights.data[1].name = f"{len(grid.levels)} levels S(q - Z)"
            self.weights.data[2].x = [grid.lo, grid.lo, None, grid.hi, grid.hi]
            self.weights.data[2].y = [0, top, None, 0, top]
            self.weights.data[2].name = f"clipping range [{grid.lo:.4f}, {grid.hi:.4f}]"
            self.weights.layout.title.text = f"Largest layer {name}: {grid.label}"

    @staticmethod
    def _describe(r: Recipe) -> str:
        weights = f"{r.weight_bits}-bit {'symmetric' if r.quant_symmetric else 'asymmetric'} {r.quant_granularity}"
        acts = f"{r.act_bits}-bit activations ({r.calibration} calibration)" if r.act_bits else "float activations"
        qat = f"QAT {r.qat_epochs} epoch{'s' if r.qat_epochs > 1 else ''}" if r.qat_epochs else "PTQ"
        return f"{weights} weights, {acts}, {qat}"

    def _fp32_packed(self, fp32: Result) -> int:
        if fp32.key not in self._fp32_bytes:  # same accounting as packed_bytes: raw tensors, no file overhead
            self._fp32_bytes[fp32.key] = quant.packed_bytes(fp32.load_model())
        return self._fp32_bytes[fp32.key]

    def _headline(self, result: Result, fp32: Result) -> str:
        packed = result.size_quantized_bytes
        return (f"{self._describe(result.recipe)}:<br>test accuracy {result.accuracy:.2%} (fp32 {fp32.accuracy:.2%}), "
                f"packed {_kb(packed)} ({self._fp32_packed(fp32) / packed:.2f}x smaller than fp32)")

    def _info_html(self, result: Result, fp32: Result) -> str:
        fp32_bytes = self._fp32_packed(fp32)
        drop = (fp32.accuracy - result.accuracy) * 100
        finite = [v for v in result.layer_sqnr.values() if math.isfinite(v)]
        sqnr = f"{sum(finite) / len(finite):.1f} dB over {len(finite)} layers" if finite else "n/a"
        packed = result.size_quantized_bytes
        rows = [
            ("test accuracy", f"{result.accuracy:.2%} (fp32 {fp32.accuracy:.2%}, drop {drop:+.2f} pp)"),
            ("packed size", f"{_kb(packed)} vs fp32 {_kb(fp32_bytes)}: {fp32_bytes / packed:.2f}x smaller"),
            ("mean weight SQNR", sqnr),
            ("setting", self._describe(result.recipe)),
            ("", "from the cache" if result.cached else f"computed in {result.train_seconds:.1f} s"),
        ]
        cells = "".join(f"<tr><td style='padding-right:1em'><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                        for k, v in rows)
        return f"<table>{cells}</table>"

"""The pruning explorer (chapter 3): ratio, scope, kind and fine-tuning -> accuracy, size, latency, weights."""

from __future__ import annotations

import html
import itertools
import os
import time
from typing import Any, Iterable

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import torch

from .. import prune
from ..errors import WorkbenchError
from ..recipe import PRUNE_KINDS, Recipe, Result, run, sweep
from ._render import render
from ._static import StaticTwin, product

__all__ = ["PruningExplorer", "AMOUNTS", "KINDS", "SCOPES"]

# The grid the controls offer (and the static twin steps through): every ratio of the slider.
AMOUNTS = tuple(round(0.05 * i, 2) for i in range(20))  # 0.00, 0.05, ..., 0.95
KINDS = PRUNE_KINDS
SCOPES = ("global", "layer")  # the recipe's third scope, "sensitivity", needs a scan: not offered here
_HIST_BINS = 80


def _layer_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, prune.PRUNABLE)}


def _kb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1024:,.1f} KB"


class PruningExplorer(StaticTwin):
    """ipywidgets explorer over pruning recipes (chapter 3).

    Every control change builds a :class:`Recipe` from `base` and the control values, runs it
    through :func:`workbench.recipe.run` (cached on disk, so a point seen before answers at once)
    and redraws: the accuracy-vs-removed-weights curve of every point computed so far with the
    same kind/scope/fine-tuning, the per-layer fraction removed, the histogram of the surviving
    weights, and the measurements of the current point.

    Args:
        base: the dense recipe to prune (its own pruning settings give the initial control values).
        cache: the result cache folder (see :func:`workbench.recipe.cache_dir`).
        max_finetune_epochs: the top of the fine-tuning slider.

    Attributes:
        base, cache: as given.
        ratio, scope, kind, finetune: the controls.
        curve, layers, weights: the plotly figures.
        info: the measurements of the current point (or the error that stopped it, in red).
        widget: everything laid out; displaying the explorer displays it.
        results: every Result computed so far, by recipe.
        last_seconds: wall time of the last :meth:`update`.

    Example:
        >>> ex = PruningExplorer(Recipe(model="mlp", epochs=30), cache="~/.cache/workbench")
        >>> ex.precompute()  # fill the cache so the slider answers at once
        >>> ex  # in a notebook: the widget
        >>> plots.show(ex.static_figure())  # the precomputed points behind a slider, for the site
    """

    CONTROLS = ("ratio", "kind", "scope", "finetune")
    PANELS = (("curve", "layers"), ("weights",))
    PREFIX = "pruned: "

    def __init__(self, base: Recipe, *, cache: str | os.PathLike | None = None,
                 max_finetune_epochs: int = 5) -> None:
        if not isinstance(base, Recipe):
            raise WorkbenchError(f"PruningExplorer needs a workbench Recipe, got {type(base).__name__}")
        if isinstance(max_finetune_epochs, bool) or not isinstance(max_finetune_epochs, int) \
                or max_finetune_epochs < 0:
            raise WorkbenchError(f"max_finetune_epochs must be an integer >= 0, got {max_finetune_epochs!r}")
        self.base = base
        self.cache = cache
        self.results: dict[Recipe, Result] = {}
        self.last_seconds = 0.0
        self._dense_weights: dict[str, dict[str, int]] = {}

        self.max_finetune_epochs = max_finetune_epochs
        self.headline = ""
        self.ratio = ipywidgets.FloatSlider(
            value=min(AMOUNTS, key=lambda a: abs(a - base.prune_amount)), min=AMOUNTS[0], max=AMOUNTS[-1],
            step=round(AMOUNTS[1] - AMOUNTS[0], 4), continuous_update=False, description="prune",
            readout_format=".2f")
        self.kind = ipywidgets.ToggleButtons(options=KINDS, value=base.prune_kind, description="kind")
        self.scope = ipywidgets.ToggleButtons(
            options=SCOPES, value=base.prune_scope, description="scope", disabled=base.prune_kind == "structured",
            tooltips=["one threshold for all layers", "the same fraction of each layer"])
        self.finetune = ipywidgets.IntSlider(
            value=min(base.finetune_epochs, max_finetune_epochs), min=0, max=max_finetune_epochs,
            continuous_update=False, description="fine-tune epochs",
            style={"description_width": "initial"})
        self.info = ipywidgets.HTML()

        self.curve = go.Figure()
        self.curve.add_scatter(x=[], y=[], mode="lines+markers", name="pruned",
                               hovertemplate="removed %{x:.1%}<br>accuracy %{y:.2%}<extra></extra>")
        self.curve.add_scatter(x=[0.0, 1.0], y=[], mode="lines", name="dense", line=dict(dash="dash", color="gray"),
                               hoverinfo="skip")
        self.curve.add_scatter(x=[], y=[], mode="markers", name="current",
                               marker=dict(size=16, symbol="star", color="crimson"))
        self.curve.update_layout(title="Test accuracy vs weights removed", height=340, width=520,
                                 margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.25),
                                 xaxis=dict(title="fraction of parameters removed (vs dense)", range=[-0.02, 1.0],
                                            tickformat=".0%"),
                                 yaxis=dict(title="test accuracy", tickformat=".0%"))
        self.layers = go.Figure()
        self.layers.add_bar(x=[], y=[], hovertemplate="%{x}: %{y:.1%} removed<extra></extra>")
        self.layers.update_layout(title="Removed per layer", height=340, width=440,
                                  margin=dict(l=60, r=20, t=50, b=50),
                                  yaxis=dict(title="fraction of weights removed", range=[0, 1], tickformat=".0%"))
        self.weights = go.Figure()
        self.weights.add_bar(x=[], y=[], marker=dict(line=dict(width=0)),
                             hovertemplate="%{x:.3f}: %{y} weights<extra></extra>")
        self.weights.update_layout(title="Non-zero weights", height=300, width=960, bargap=0,
                                   margin=dict(l=60, r=20, t=50, b=50),
                                   xaxis_title="weight value (Linear/Conv2d layers)",
                                   yaxis=dict(title="weights", type="log"))

        # Figures are plain go.Figure objects drawn into Output widgets. A plotly FigureWidget
        # (anywidget) would save the whole 5 MB plotly.js bundle in the notebook's widget state
        # once per figure, bloating every executed notebook and the book's pages.
        self._outputs = {name: ipywidgets.Output() for name in ("curve", "layers", "weights")}
        self.widget = ipywidgets.VBox([
            ipywidgets.HBox([self.ratio, self.finetune]),
            ipywidgets.HBox([self.kind, self.scope]),
            self.info,
            ipywidgets.HBox([self._outputs["curve"], self._outputs["layers"]]),
            self._outputs["weights"],
        ])
        for control in (self.ratio, self.kind, self.scope, self.finetune):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _recipe_for(self, amount: float, kind: str, scope: str, finetune: int) -> Recipe:
        amount = round(float(amount), 4)  # 0.1 + 0.2 style float noise must not split cache keys
        if amount == 0:
            return self.base.dense()
        changes: dict[str, Any] = dict(prune_amount=amount, prune_kind=kind, prune_scope=scope,
                                       finetune_epochs=finetune)
        if kind == "structured":
            # Structured pruning is one-shot and has no scope: pinning those settings to their
            # defaults keeps one cache key per point (and a gradual base still works).
            defaults = self.base.dense()
            changes.update(prune_scope=defaults.prune_scope, prune_schedule=defaults.prune_schedule,
                           prune_steps=defaults.prune_steps)
        return self.base.replace(**changes)

    def recipe(self) -> Recipe:
        """The recipe for the current control values (ratio 0 is the dense baseline itself).

        Example:
            >>> ex.ratio.value = 0.5; ex.recipe().prune_amount
            0.5
        """
        return self._recipe_for(self.ratio.value, self.kind.value, self.scope.value, self.finetune.value)

    def _run(self, recipe: Recipe) -> Result:
        result = run(recipe, cache=self.cache, progress=False)
        self.results[recipe] = result
        return result

    def _dense(self) -> Result:
        dense = self.base.dense()
        return self.results[dense] if dense in self.results else self._run(dense)

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer: ratios x kinds x scopes (unstructured only) x fine-tune epochs."""
        finetunes = range(self.max_finetune_epochs + 1)
        dense_scope = self.base.dense().prune_scope
        return (product(kind=["unstructured"], scope=SCOPES, finetune=finetunes, ratio=AMOUNTS)
                + product(kind=["structured"], scope=[dense_scope], finetune=finetunes, ratio=AMOUNTS))

    def needs(self, setting: Any) -> list[Recipe]:
        return [self._recipe_for(setting["ratio"], setting["kind"], setting["scope"], setting["finetune"]),
                self.base.dense()]

    def label(self, setting: Any) -> str:
        kind, scope, finetune = setting["kind"], setting["scope"], setting["finetune"]
        return " ".join([f"{setting['ratio']:.0%}"] + (["structured"] if kind == "structured" else
                                                       [scope] if scope != SCOPES[0] else [])
                        + ([f"ft {finetune}"] if finetune else []))

    def update(self, change: Any = None) -> Result | None:
        """Run the current recipe (through the cache) and redraw everything.

        Returns:
            The Result, or None when the settings are impossible (a :class:`WorkbenchError`
            inside `run`, e.g. structured pruning that would remove every channel of a layer):
            the message is then shown in red in `info` and the controls stay usable.

        Example:
            >>> res = ex.update(); res.cached
            True
        """
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        t0 = time.perf_counter()
        self.scope.disabled = self.kind.value == "structured"
        try:
            result = self._run(self.recipe())
            dense = self._dense()
        except WorkbenchError as exc:
            self.info.value = f'<p style="color:#c62828"><b>Cannot run this setting:</b> {html.escape(str(exc))}</p>'
            self.headline = f"cannot run this setting: {exc}"
            if self.base.dense() in self.results:
                self._draw_curve(None, self.results[self.base.dense()])
                self._render()
            self.last_seconds = time.perf_counter() - t0
            return None
        model = result.load_model()
        self._draw_curve(result, dense)
        self._draw_layers(result, dense, model)
        self._draw_weights(model)
        self.info.value = self._info_html(result, dense)
        self.headline = self._headline(result, dense)
        self._render()
        self.last_seconds = time.perf_counter() - t0
        return result

    def _render(self) -> None:
        if not self._quiet:
            render(self._outputs, self)

    def precompute(self, amounts: Iterable[float] = (0.0, 0.5, 0.8, 0.9, 0.95), **settings: Any) -> list[Result]:
        """Fill the cache with a :func:`workbench.recipe.sweep` so the sliders answer at once.

        Args:
            amounts: pruning ratios to compute.
            **settings: ``kind``, ``scope``, ``finetune``: one value or a list of values each
                (every combination is computed); the current control values by default.

        Returns:
            The Results, amounts varying fastest.

        Example:
            >>> ex.precompute((0.5, 0.9), kind=["unstructured", "structured"], finetune=[0, 2])
        """
        unknown = sorted(set(settings) - {"kind", "scope", "finetune"})
        if unknown:
            raise WorkbenchError(f"unknown precompute setting(s) {', '.join(unknown)}; known: kind, scope, finetune")
        amounts = tuple(amounts)
        axes = []
        for name in ("kind", "scope", "finetune"):
            value = settings.get(name, getattr(self, name).value)
            axes.append(list(value) if isinstance(value, (list, tuple)) else [value])
        recipes = [self._recipe_for(a, kind, scope, ft)
                   for kind, scope, ft in itertools.product(*axes) for a in amounts]
        results = sweep(recipes, cache=self.cache, progress=False)
        self.results.update(zip(recipes, results))
        self.update()
        return results

    # -- drawing: arranging Result fields, nothing measured here -----------------------------

    def _removed(self, result: Result, dense: Result) -> float:
        # Non-zeros against the dense parameter count: the same measure for zeroed weights
        # (unstructured) and for removed channels (structured), so the two curves compare.
        return 1.0 - result.nonzero_params / dense.params

    def _draw_curve(self, result: Result | None, dense: Result) -> None:
        kind, finetune = self.kind.value, self.finetune.value
        scope = self.scope.value if kind == "unstructured" else self.base.dense().prune_scope
        same = (kind, scope, finetune)
        # The dense model is the amount-0 point of every family.
        family = [res for r, res in self.results.items()
                  if r == self.base.dense() or (r.prune_kind, r.prune_scope, r.finetune_epochs) == same]
        points = sorted((self._removed(res, dense), res.accuracy) for res in family)
        with self.curve.batch_update():
            self.curve.data[0].x = [p[0] for p in points]
            self.curve.data[0].y = [p[1] for p in points]
            self.curve.data[0].name = (f"{kind}" + (f" {scope}" if kind == "unstructured" else "")
                                       + f", fine-tune {finetune}")
            self.curve.data[1].y = [dense.accuracy, dense.accuracy]
            self.curve.data[1].name = f"dense {dense.accuracy:.2%}"
            self.curve.data[2].x = [self._removed(result, dense)] if result else []
            self.curve.data[2].y = [result.accuracy] if result else []

    def _draw_layers(self, result: Result, dense: Result, model: torch.nn.Module) -> None:
        if result.recipe.prune_kind == "structured" and result.recipe.compressed:
            # The pruned layers are smaller, not sparse: compare their sizes with the dense ones.
            if dense.key not in self._dense_weights:
                self._dense_weights[dense.key] = {n: w.numel() for n, w in _layer_weights(dense.load_model()).items()}
            full = self._dense_weights[dense.key]
            removed = {n: 1.0 - w.numel() / full[n] for n, w in _layer_weights(model).items()}
            title = "Weights removed per layer (smaller layers vs dense)"
        else:
            removed = result.layer_sparsity
            title = "Sparsity per layer (weights set to zero)"
        with self.layers.batch_update():
            self.layers.data[0].x = list(removed)
            self.layers.data[0].y = list(removed.values())
            self.layers.layout.title.text = title

    def _draw_weights(self, model: torch.nn.Module) -> None:
        w = torch.cat([t.reshape(-1) for t in _layer_weights(model).values()]).numpy()
        nonzero = w[w != 0]
        # Binned here rather than by plotly: shipping every weight (10^5-10^6 of them) to the
        # browser on each slider move would make the widget lag.
        counts, edges = np.histogram(nonzero, bins=_HIST_BINS) if nonzero.size else (np.zeros(0), np.zeros(1))
        with self.weights.batch_update():
            self.weights.data[0].x = (edges[:-1] + edges[1:]) / 2
            self.weights.data[0].y = counts
            self.weights.data[0].width = float(edges[1] - edges[0]) if nonzero.size else None
            self.weights.layout.title.text = (f"{nonzero.size:,} non-zero weights "
                                              f"({w.size - nonzero.size:,} exact zeros not drawn)")

    def _headline(self, result: Result, dense: Result) -> str:
        r = result.recipe
        left = f"{result.nonzero_params:,} of {dense.params:,} parameters non-zero"
        if not r.prune_amount:
            return f"dense model (nothing pruned): test accuracy {result.accuracy:.2%}, {left}"
        what = (f"{r.prune_amount:.0%} pruned, {r.prune_kind}" + (f" {r.prune_scope}" if r.prune_kind == "unstructured"
                                                                  else "") + f", fine-tune {r.finetune_epochs}")
        return f"{what}: test accuracy {result.accuracy:.2%} (dense {dense.accuracy:.2%}), {left}"

    def _info_html(self, result: Result, dense: Result) -> str:
        drop = (dense.accuracy - result.accuracy) * 100
        sparse = {k: v for k, v in result.sparse_bytes.items() if k != "dense"}
        best = min(sparse, key=sparse.get) if sparse else None
        ort = result.latency_ort_b1
        rows = [
            ("test accuracy", f"{result.accuracy:.2%} (dense {dense.accuracy:.2%}, drop {drop:+.2f} pp)"),
            ("params / non-zeros", f"{result.params:,} / {result.nonzero_params:,} (dense {dense.params:,})"),
            ("MACs", f"{result.macs:,} (dense {dense.macs:,})"),
            ("ONNX file", _kb(result.size_onnx_bytes)),
            ("best sparse format", f"{best} {_kb(sparse[best])} (dense weights {_kb(result.sparse_bytes['dense'])})"
             if best else "n/a"),
            ("ORT batch-1 p50", f"{ort.p50_us:,.1f} us" if ort else "n/a (no ONNX export)"),
            ("", "from the cache" if result.cached else f"computed in {result.train_seconds:.1f} s"),
        ]
        cells = "".join(f"<tr><td style='padding-right:1em'><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                        for k, v in rows)
        return f"<table>{cells}</table>"

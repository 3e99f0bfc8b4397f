"""The LR decay explorer (chapter 7): schedule, base LR, decay, warmup -> the LR curve and the real training curves."""

from __future__ import annotations

import html
import os
import time
from typing import Any, Iterable

import ipywidgets
import plotly.graph_objects as go

from .. import schedules
from ..data import load
from ..errors import WorkbenchError
from ..recipe import Recipe, Result, run, sweep
from ._render import render
from ._static import StaticTwin, product

__all__ = ["LRExplorer", "LR_CHOICES", "GAMMAS", "POWERS"]

# The grid the controls offer (and the static twin steps through), besides schedules.KINDS and
# 0..3 warmup epochs.
LR_CHOICES = (1e-3, 3e-3, 1e-2, 3e-2, 5e-2, 1e-1)
GAMMAS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # LR factor per drop ("step") or per epoch
POWERS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # polynomial exponents


class LRExplorer(StaticTwin):
    """ipywidgets explorer over LR schedules: each setting is a Recipe trained once and cached.

    The LR curve is drawn from :mod:`workbench.schedules` step by step; the loss and accuracy
    curves are the recorded history of the real training run of that schedule (and of the
    constant-LR run with the same base LR, for comparison).

    Args:
        base: the training recipe (its model, data, epochs, optimizer).
        cache: the result cache folder.

    Attributes:
        kind, lr, gamma, power, warmup: the controls (gamma is the LR factor per drop for
            "step", per epoch for "exponential"; power is the polynomial exponent).
        lr_curve, curves: the plotly figures; info: the numbers; results; last_seconds.

    Example:
        >>> ex = LRExplorer(Recipe(model="cnn", epochs=8, optimizer="sgd", lr=0.1)); ex
        >>> ex.precompute(); plots.show(ex.static_figure())  # the precomputed points behind a slider
    """

    CONTROLS = ("kind", "lr", "gamma", "power", "warmup")
    PANELS = (("lr_curve", "curves"),)
    PREFIX = ""

    def __init__(self, base: Recipe, *, cache: str | os.PathLike | None = None) -> None:
        if not isinstance(base, Recipe):
            raise WorkbenchError(f"LRExplorer needs a workbench Recipe, got {type(base).__name__}")
        if base.epochs < 1:
            raise WorkbenchError(f"LRExplorer needs a recipe that trains (epochs >= 1), got epochs={base.epochs}")
        self.base = base.replace(lr_schedule="constant", lr_schedule_options={})
        self.cache = cache
        self.results: dict[Recipe, Result] = {}
        self.last_seconds = 0.0
        ds = load(base.dataset, seed=base.seed)
        self.steps_per_epoch = schedules.steps_per_epoch(len(ds.X_train), base.batch_size)
        self.headline = ""
        lr0 = min(LR_CHOICES, key=lambda v: abs(v - base.lr))
        self.kind = ipywidgets.Dropdown(options=schedules.KINDS, value="cosine", description="schedule")
        self.lr = ipywidgets.SelectionSlider(options=[(f"{v:g}", v) for v in LR_CHOICES], value=lr0,
                                             description="base LR", continuous_update=False)
        self.gamma = ipywidgets.FloatSlider(value=0.5, min=GAMMAS[0], max=GAMMAS[-1],
                                            step=round(GAMMAS[1] - GAMMAS[0], 4), description="gamma",
                                            continuous_update=False)
        self.power = ipywidgets.FloatSlider(value=1.0, min=POWERS[0], max=POWERS[-1],
                                            step=round(POWERS[1] - POWERS[0], 4), description="power",
                                            continuous_update=False)
        self.warmup = ipywidgets.IntSlider(value=0, min=0, max=max(0, min(3, base.epochs - 1)),
                                           description="warmup epochs", continuous_update=False,
                                           style={"description_width": "initial"})
        self.info = ipywidgets.HTML()
        self.lr_curve = go.Figure()
        self.lr_curve.add_scatter(x=[], y=[], mode="lines", name="schedule")
        self.lr_curve.update_layout(title="Learning rate per optimizer step", height=320, width=460,
                                    margin=dict(l=60, r=20, t=50, b=50), xaxis_title="step",
                                    yaxis=dict(title="learning rate", rangemode="tozero"))
        self.curves = go.Figure()
        for name, axis, dash in (("train loss", "y", None), ("train loss, constant LR", "y", "dot"),
                                 ("val accuracy", "y2", None), ("val accuracy, constant LR", "y2", "dot")):
            self.curves.add_scatter(x=[], y=[], mode="lines+markers", name=name, yaxis=axis,
                                    line=dict(dash=dash) if dash else None)
        self.curves.update_layout(title="Training with this schedule (real runs)", height=320, width=520,
                                  margin=dict(l=60, r=60, t=50, b=50), xaxis_title="epoch",
                                  yaxis=dict(title="train loss", type="log"),
                                  yaxis2=dict(title="val accuracy", overlaying="y", side="right", tickformat=".0%"),
                                  legend=dict(orientation="h", y=-0.3))
        self._outputs = {name: ipywidgets.Output() for name in ("lr_curve", "curves")}
        self.widget = ipywidgets.VBox([
            ipywidgets.HBox([self.kind, self.lr]), ipywidgets.HBox([self.gamma, self.power, self.warmup]),
            self.info, ipywidgets.HBox([self._outputs["lr_curve"], self._outputs["curves"]])])
        for control in (self.kind, self.lr, self.gamma, self.power, self.warmup):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def recipe_for(self, kind: str, lr: float, gamma: float, power: float, warmup: int) -> Recipe:
        """The Recipe of one setting (gamma per epoch becomes the per-step factor for "exponential")."""
        opts: dict[str, Any] = {}
        if warmup:
            opts["warmup_epochs"] = int(warmup)
        if kind == "step":
            opts |= {"gamma": round(gamma, 4), "step_epochs": max(1, (self.base.epochs - warmup) // 3)}
        elif kind == "exponential":
            opts["gamma"] = round(round(gamma, 4) ** (1 / self.steps_per_epoch), 12)
        elif kind == "polynomial":
            opts["power"] = round(power, 4)
        return self.base.replace(lr=lr, lr_schedule=kind, lr_schedule_options=opts)

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer: base LRs x kinds x warmup x power x gamma (gamma varying fastest)."""
        return product(lr=LR_CHOICES, kind=schedules.KINDS, warmup=range(self.warmup.max + 1), power=POWERS,
                       gamma=GAMMAS)

    def needs(self, setting: Any) -> list[Recipe]:
        # gamma and power only matter to the kinds that use them: other kinds dedupe to one point.
        return [self.recipe_for(setting["kind"], setting["lr"], setting["gamma"], setting["power"],
                                setting["warmup"]), self.base.replace(lr=setting["lr"])]

    def label(self, setting: Any) -> str:
        return f"{setting['kind']}, LR {setting['lr']:g}"

    def recipe(self) -> Recipe:
        """The Recipe for the current control values."""
        return self.recipe_for(self.kind.value, self.lr.value, self.gamma.value, self.power.value, self.warmup.value)

    def _run(self, recipe: Recipe) -> Result:
        if recipe not in self.results:
            self.results[recipe] = run(recipe, cache=self.cache, progress=False)
        return self.results[recipe]

    def update(self, change: Any = None) -> Result | None:
        """Train (or fetch) the current schedule and its constant-LR twin; redraw."""
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        t0 = time.perf_counter()
        self.gamma.disabled = self.kind.value not in ("step", "exponential")
        self.power.disabled = self.kind.value != "polynomial"
        try:
            recipe = self.recipe()
            result = self._run(recipe)
            flat = self._run(self.base.replace(lr=self.lr.value))
        except WorkbenchError as exc:
            self.info.value = f'<p style="color:#c62828"><b>Cannot run this setting:</b> {html.escape(str(exc))}</p>'
            self.headline = f"cannot run this setting: {exc}"
            self.last_seconds = time.perf_counter() - t0
            return None
        sched = recipe.lr_schedule_for(self.steps_per_epoch) or schedules.Schedule(
            "constant", total_steps=self.base.epochs * self.steps_per_epoch)
        epochs = list(range(1, len(result.history["train_loss"]) + 1))
        with self.lr_curve.batch_update():
            self.lr_curve.data[0].x = list(range(sched.total_steps))
            self.lr_curve.data[0].y = sched.curve(self.lr.value)
            self.lr_curve.data[0].name = self.kind.value
        with self.curves.batch_update():
            for trace, res, key in zip(self.curves.data, (result, flat, result, flat),
                                       ("train_loss", "train_loss", "val_acc", "val_acc")):
                trace.x, trace.y = epochs, res.history[key]
        self.info.value = (f"<b>{html.escape(self.kind.value)}</b> from LR {self.lr.value:g}: test accuracy "
                           f"<b>{result.accuracy:.2%}</b> (constant LR {flat.accuracy:.2%}); final train loss "
                           f"{result.history['train_loss'][-1]:.4f} (constant {flat.history['train_loss'][-1]:.4f})"
                           + (" &middot; from the cache" if result.cached else ""))
        self.headline = (f"{self.kind.value} from LR {self.lr.value:g}{self._options_text(recipe)}: test accuracy "
                         f"{result.accuracy:.2%} (constant LR {flat.accuracy:.2%}), final train loss "
                         f"{result.history['train_loss'][-1]:.4f} (constant {flat.history['train_loss'][-1]:.4f})")
        if not self._quiet:
            render(self._outputs, self)
        self.last_seconds = time.perf_counter() - t0
        return result

    def _options_text(self, recipe: Recipe) -> str:
        kind, opts = recipe.lr_schedule, dict(recipe.lr_schedule_options)
        parts = [f"gamma {self.gamma.value:g}" + (" per epoch" if kind == "exponential" else "")] \
            if kind in ("step", "exponential") else []
        parts += [f"power {opts['power']:g}"] if kind == "polynomial" else []
        parts += [f"{opts['warmup_epochs']} warmup epoch(s)"] if opts.get("warmup_epochs") else []
        return f" ({', '.join(parts)})" if parts else ""

    def precompute(self, kinds: Iterable[str] = schedules.KINDS, lrs: Iterable[float] | None = None) -> list[Result]:
        """Train every schedule kind (at the current gamma/power/warmup) for each base LR, through the cache."""
        lrs = list(lrs) if lrs is not None else [self.lr.value]
        recipes = [self.recipe_for(k, lr, self.gamma.value, self.power.value, self.warmup.value)
                   for lr in lrs for k in kinds]
        results = sweep(recipes, cache=self.cache, progress=False)
        self.results.update(zip(recipes, results))
        self.update()
        return results

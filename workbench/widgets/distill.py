"""The distillation explorer (chapter 5): temperature and alpha -> distilled accuracy, soft targets."""

from __future__ import annotations

import html
import itertools
import os
import time
from typing import Any, Iterable

import ipywidgets
import plotly.graph_objects as go
import torch

from .. import data as _data
from ..distill import soft_targets
from ..errors import WorkbenchError
from ..recipe import Recipe, Result, run, sweep
from ..train import predict
from ._render import render
from ._static import StaticTwin, product

__all__ = ["DistillationExplorer", "TEMPERATURES", "ALPHAS"]

# The grid the controls offer (and the static twin steps through): the temperature slider's
# default stops and every alpha of its slider.
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 20.0)
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


class DistillationExplorer(StaticTwin):
    """ipywidgets explorer over knowledge-distillation recipes (chapter 5).

    Every control change builds the distilled student's :class:`Recipe` (`student` with `teacher`,
    the temperature and alpha of the controls), runs it through :func:`workbench.recipe.run`
    (cached on disk: the teacher and the student trained alone are computed once, and a point
    seen before answers at once) and redraws: test accuracy against temperature for every point
    computed so far at the current alpha, with the teacher and the student trained alone as
    lines; and the teacher's soft targets ``softmax(z / T)`` for one test image at the current T,
    next to the plain softmax (T = 1), which shows how the temperature brings out the "dark
    knowledge" in the small probabilities of the wrong classes.

    Args:
        student: the small model's recipe (its own teacher/temperature/alpha settings give the
            initial control values; ``student.replace(teacher=None)`` is the student alone).
        teacher: the large model's recipe, on the same dataset. It is trained on the student's
            data split (the split depends on ``student.seed``).
        cache: the result cache folder (see :func:`workbench.recipe.cache_dir`).
        temperatures: the temperature slider's stops.
        example: index of the test image whose soft targets are drawn; default the one where
            the teacher gives its runner-up class the most probability (the most dark knowledge).

    Attributes:
        student, teacher, cache: as given.
        temperature, alpha: the controls.
        curve, soft, image: the plotly figures.
        info: the measurements of the current point (or the error that stopped it, in red).
        widget: everything laid out; displaying the explorer displays it.
        results: every Result computed so far, by recipe.
        teacher_result, alone: the Results of the teacher and of the student trained alone.
        last_seconds: wall time of the last :meth:`update`.

    Example:
        >>> ex = DistillationExplorer(Recipe(model="mlp", model_options={"hidden": [32]}),
        ...                           Recipe(model="cnn", epochs=30))
        >>> ex.precompute()  # every temperature at the current alpha, so the slider answers at once
        >>> ex  # in a notebook: the widget
        >>> plots.show(ex.static_figure())  # the precomputed points behind a slider, for the site
    """

    CONTROLS = ("temperature", "alpha")
    PANELS = (("curve", "soft"),)
    PREFIX = "T = "

    def __init__(self, student: Recipe, teacher: Recipe, *, cache: str | os.PathLike | None = None,
                 temperatures: Iterable[float] = TEMPERATURES, example: int | None = None) -> None:
        for name, r in (("student", student), ("teacher", teacher)):
            if not isinstance(r, Recipe):
                raise WorkbenchError(f"DistillationExplorer needs a workbench Recipe as {name}, got {type(r).__name__}")
        if teacher.dataset != student.dataset:
            raise WorkbenchError(f"the teacher is trained on {teacher.dataset!r} but the student on "
                                 f"{student.dataset!r}; distillation needs the same data")
        temperatures = tuple(temperatures)
        try:
            temps = tuple(sorted({float(t) for t in temperatures}))
        except (TypeError, ValueError):
            temps = ()
        if not temps or any(not 0 < t < float("inf") for t in temps):
            raise WorkbenchError(f"temperatures must be numbers > 0, got {temperatures!r}")
        self.student = student
        self.teacher = teacher
        self._temps = temps
        self.cache = cache
        self.results: dict[Recipe, Result] = {}
        self.last_seconds = 0.0

        # The teacher runs on the student's split (as inside run()), so this is the same cache entry.
        ds = _data.load(student.dataset, seed=student.seed)
        self.teacher_result = run(teacher, data=ds, cache=cache, progress=False)
        self.alone = self._run(student.replace(teacher=None))
        self._logits = predict(self.teacher_result.load_model(), ds.X_test)
        if example is None:
            second = torch.softmax(self._logits, dim=1).topk(2, dim=1).values[:, 1]
            example = int(second.argmax())
        if isinstance(example, bool) or not isinstance(example, int) or not 0 <= example < len(ds.y_test):
            raise WorkbenchError(f"example must be an index into the {len(ds.y_test)} test images, got {example!r}")
        self.example = example
        self._classes = list(ds.classes)
        self._label = int(ds.y_test[example])

        self.headline = ""
        start = min(temps, key=lambda t: abs(t - student.kd_temperature))
        self.temperature = ipywidgets.SelectionSlider(
            options=[(f"{t:g}", t) for t in temps], value=start, continuous_update=False,
            description="temperature T", style={"description_width": "initial"})
        self.alpha = ipywidgets.FloatSlider(
            value=min(ALPHAS, key=lambda a: abs(a - student.kd_alpha)), min=ALPHAS[0], max=ALPHAS[-1],
            step=round(ALPHAS[1] - ALPHAS[0], 4), continuous_update=False,
            description="alpha (soft weight)", readout_format=".1f", style={"description_width": "initial"})
        self.info = ipywidgets.HTML()

        span = [temps[0], temps[-1]]
        self.curve = go.Figure()
        self.curve.add_scatter(x=[], y=[], mode="lines+markers", name="distilled",
                               hovertemplate="T %{x:g}<br>accuracy %{y:.2%}<extra></extra>")
        self.curve.add_scatter(x=span, y=[self.teacher_result.accuracy] * 2, mode="lines",
                               name=f"teacher {self.teacher_result.accuracy:.2%}",
                               line=dict(dash="dash", color="seagreen"), hoverinfo="skip")
        self.curve.add_scatter(x=span, y=[self.alone.accuracy] * 2, mode="lines",
                               name=f"student alone {self.alone.accuracy:.2%}",
                               line=dict(dash="dot", color="gray"), hoverinfo="skip")
        self.curve.add_scatter(x=[], y=[], mode="markers", name="current",
                               marker=dict(size=16, symbol="star", color="crimson"))
        self.curve.update_layout(title="Distilled student: test accuracy vs temperature", height=360, width=470,
                                 margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.3),
                                 xaxis=dict(title="temperature T", type="log", tickvals=list(temps)),
                                 yaxis=dict(title="test accuracy", tickformat=".1%"))
        self.soft = go.Figure()
        self.soft.add_bar(x=self._classes, y=[], name="T = 1 (plain softmax)", marker_color="lightgray",
                          hovertemplate="class %{x}: %{y:.4f}<extra>T = 1</extra>")
        self.soft.add_bar(x=self._classes, y=[], name="T", marker_color="royalblue",
                          hovertemplate="class %{x}: %{y:.4f}<extra></extra>")
        self.soft.update_layout(height=360, width=380, barmode="group", margin=dict(l=60, r=20, t=50, b=50),
                                legend=dict(orientation="h", y=-0.3),
                                xaxis=dict(title="class", type="category"),
                                yaxis=dict(title="teacher's probability", range=[0, 1]))
        img = ds.X_test[example]
        self.image = go.Figure(go.Heatmap(z=img[0].flip(0).tolist(), colorscale="Greys", showscale=False,
                                          hoverinfo="skip"))
        self.image.update_layout(title=dict(text=f"test image #{example}, label {self._classes[self._label]}",
                                            font=dict(size=12)),
                                 height=200, width=180, margin=dict(l=10, r=10, t=40, b=10),
                                 xaxis=dict(visible=False), yaxis=dict(visible=False, scaleanchor="x"))

        # Plain go.Figure objects drawn into Output widgets (not FigureWidget: see PruningExplorer).
        self._outputs = {name: ipywidgets.Output() for name in ("curve", "soft", "image")}
        self.widget = ipywidgets.VBox([
            ipywidgets.HBox([self.temperature, self.alpha]),
            self.info,
            ipywidgets.HBox([self._outputs["curve"], self._outputs["soft"], self._outputs["image"]]),
        ])
        for control in (self.temperature, self.alpha):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _recipe_for(self, temperature: float, alpha: float) -> Recipe:
        # Rounded so that 0.1 + 0.2 style float noise never splits one point into two cache keys.
        return self.student.replace(teacher=self.teacher, kd_temperature=float(temperature),
                                    kd_alpha=round(float(alpha), 4))

    def recipe(self) -> Recipe:
        """The distilled student's recipe for the current control values.

        Example:
            >>> ex.temperature.value = 8.0; ex.recipe().kd_temperature
            8.0
        """
        return self._recipe_for(self.temperature.value, self.alpha.value)

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer: alphas x temperatures (temperature varying fastest)."""
        return product(alpha=ALPHAS, temperature=self._temps)

    def needs(self, setting: Any) -> list[Recipe]:
        return [self._recipe_for(setting["temperature"], setting["alpha"])]

    def label(self, setting: Any) -> str:
        return f"{setting['temperature']:g}" + (f" (alpha {setting['alpha']:g})" if len(self._alphas()) > 1 else "")

    def _alphas(self) -> set[float]:
        return {r.kd_alpha for r in self.results if r.teacher is not None}

    def _run(self, recipe: Recipe) -> Result:
        result = run(recipe, cache=self.cache, progress=False)
        self.results[recipe] = result
        return result

    def update(self, change: Any = None) -> Result | None:
        """Run the current recipe (through the cache) and redraw everything.

        Returns:
            The Result, or None when `run` refused the setting (a :class:`WorkbenchError`): the
            message is then shown in red in `info` and the controls stay usable.

        Example:
            >>> res = ex.update(); res.cached
            True
        """
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        t0 = time.perf_counter()
        self._draw_soft()  # needs only the teacher's logits: drawn even if the run fails
        try:
            result = self._run(self.recipe())
        except WorkbenchError as exc:
            self.info.value = f'<p style="color:#c62828"><b>Cannot run this setting:</b> {html.escape(str(exc))}</p>'
            self.headline = f"cannot run this setting: {exc}"
            self._draw_curve(None)
            self._render()
            self.last_seconds = time.perf_counter() - t0
            return None
        self._draw_curve(result)
        self.info.value = self._info_html(result)
        self.headline = self._headline(result)
        self._render()
        self.last_seconds = time.perf_counter() - t0
        return result

    def _render(self) -> None:
        if not self._quiet:
            render(self._outputs, self)

    def precompute(self, temperatures: Iterable[float] | None = None,
                   alphas: float | Iterable[float] | None = None) -> list[Result]:
        """Fill the cache with a :func:`workbench.recipe.sweep` so the sliders answer at once.

        Args:
            temperatures: the temperatures to compute; default every stop of the slider.
            alphas: one alpha or several (every combination is computed); default the current one.

        Returns:
            The Results, temperatures varying fastest.

        Example:
            >>> ex.precompute((2, 4, 8), alphas=[0.5, 0.9])
        """
        temps = self._temps if temperatures is None else tuple(float(t) for t in temperatures)
        alphas = [self.alpha.value] if alphas is None else (
            [alphas] if isinstance(alphas, (int, float)) else list(alphas))
        recipes = [self._recipe_for(t, a) for a, t in itertools.product(alphas, temps)]
        results = sweep(recipes, cache=self.cache, progress=False)
        self.results.update(zip(recipes, results))
        self.update()
        return results

    # -- drawing: arranging Result fields and the teacher's logits ---------------------------

    def _draw_curve(self, result: Result | None) -> None:
        alpha = round(float(self.alpha.value), 4)
        points = sorted((r.kd_temperature, res.accuracy) for r, res in self.results.items()
                        if r.teacher is not None and r.kd_alpha == alpha)
        with self.curve.batch_update():
            self.curve.data[0].x = [p[0] for p in points]
            self.curve.data[0].y = [p[1] for p in points]
            self.curve.data[0].name = f"distilled, alpha {alpha:g}"
            self.curve.data[3].x = [result.recipe.kd_temperature] if result else []
            self.curve.data[3].y = [result.accuracy] if result else []

    def _draw_soft(self) -> None:
        t = float(self.temperature.value)
        z = self._logits[self.example]
        p1, pt = soft_targets(z, temperature=1.0), soft_targets(z, temperature=t)
        # Entropy in bits: 0 for a one-hot answer, log2(10) = 3.32 for a uniform one.
        bits = float(-(pt * torch.log2(pt.clamp_min(1e-30))).sum())
        with self.soft.batch_update():
            self.soft.data[0].y = p1.tolist()
            self.soft.data[1].y = pt.tolist()
            self.soft.data[1].name = f"T = {t:g}"
            self.soft.layout.title.text = (f"Teacher's soft targets, test image #{self.example} "
                                           f"(entropy {bits:.2f} bits at T = {t:g})")

    def _headline(self, result: Result) -> str:
        r = result.recipe
        return (f"T = {r.kd_temperature:g}, alpha = {r.kd_alpha:g}: distilled student {result.accuracy:.2%} "
                f"(alone {self.alone.accuracy:.2%}, teacher {self.teacher_result.accuracy:.2%}, "
                f"gain {(result.accuracy - self.alone.accuracy) * 100:+.2f} pp)")

    def _info_html(self, result: Result) -> str:
        teacher, alone = self.teacher_result, self.alone
        gain = (result.accuracy - alone.accuracy) * 100
        gap = (teacher.accuracy - alone.accuracy) * 100
        closed = f"{gain / gap:.0%} of the {gap:.2f} pp gap" if gap > 0 else "no gap to close"
        rows = [
            ("test accuracy", f"{result.accuracy:.2%} distilled, {alone.accuracy:.2%} alone, "
                              f"{teacher.accuracy:.2%} teacher"),
            ("gain from distillation", f"{gain:+.2f} pp ({closed})"),
            ("params", f"{result.params:,} student, {teacher.params:,} teacher "
                       f"(1/{teacher.params / result.params:.1f})"),
            ("setting", f"T = {result.recipe.kd_temperature:g}, alpha = {result.recipe.kd_alpha:g}"),
            ("", "from the cache" if result.cached else f"computed in {result.train_seconds:.1f} s"),
        ]
        cells = "".join(f"<tr><td style='padding-right:1em'><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                        for k, v in rows)
        note = ("<p style='margin:0'><i>One test set, one seed: differences of a few tenths of a point are one "
                f"or two of the {len(self._logits)} test images.</i></p>")
        return f"<table>{cells}</table>{note}"

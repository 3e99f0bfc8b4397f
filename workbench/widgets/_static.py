"""The static twin of an explorer: its own figures, precomputed at every cached grid point, behind a slider.

Every explorer offers a grid of control values (module constants it builds its controls from).
:meth:`StaticTwin.static_figure` sets the controls to each grid point whose Results are already
computed, lets the explorer draw its figures exactly as the widget does (the same drawing code,
not a copy), and hands those states to :func:`workbench.plots.slider_figure`: a plotly figure
that works with no kernel, as on the published book.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Sequence

import plotly.graph_objects as go

from .. import plots
from ..errors import WorkbenchError
from ..recipe import Recipe

__all__ = ["StaticTwin", "product"]


def product(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the named control values, the last name varying fastest."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(tuple(v) for v in axes.values()))]


class StaticTwin:
    """Mixin: what an explorer defines to get :meth:`set_controls` and :meth:`static_figure`.

    An explorer sets ``_hold = False``, ``_quiet = False`` and ``headline`` (the numbers of the
    current point, one line) and defines ``CONTROLS`` (the names of its control attributes),
    ``PANELS`` (its figure attributes, panels per row), :meth:`grid`, :meth:`needs` and
    :meth:`label`. Its ``update`` returns at once while ``_hold`` is set and does not render
    while ``_quiet`` is set.
    """

    CONTROLS: tuple[str, ...] = ()
    PANELS: tuple[tuple[str, ...], ...] = ()
    PREFIX = ""
    _hold = False
    _quiet = False
    headline = ""
    results: dict[Recipe, Any]

    def grid(self) -> list[dict[str, Any]]:  # pragma: no cover - every explorer defines it
        """Every combination of control values the widget offers."""
        raise NotImplementedError

    def needs(self, setting: Mapping[str, Any]) -> list[Recipe]:  # pragma: no cover
        """The recipes whose Results draw `setting` (raises WorkbenchError for impossible settings)."""
        raise NotImplementedError

    def label(self, setting: Mapping[str, Any]) -> str:  # pragma: no cover
        """The slider label of `setting`."""
        raise NotImplementedError

    def controls(self) -> dict[str, Any]:
        """The current value of every control, by name."""
        return {name: getattr(self, name).value for name in self.CONTROLS}

    def drawn(self, attrs: Sequence[str] = plots.STEP_ATTRS) -> list[dict[str, Any]]:
        """The traces of the panels as drawn now (the attributes a static slider step sets)."""
        return plots.trace_state([t for row in self.PANELS for name in row for t in getattr(self, name).data], attrs)

    def set_controls(self, **values: Any) -> Any:
        """Set several controls at once and redraw once: no point between the old and new values is run.

        Example:
            >>> ex.set_controls(kind="structured", ratio=0.5)
        """
        unknown = sorted(set(values) - set(self.CONTROLS))
        if unknown:
            raise WorkbenchError(f"unknown control(s) {', '.join(unknown)}; known: {', '.join(self.CONTROLS)}")
        self._hold = True
        try:
            for name, value in values.items():
                getattr(self, name).value = value
        finally:
            self._hold = False
        return self.update()  # type: ignore[attr-defined]

    def distinct_grid(self) -> list[tuple[dict[str, Any], tuple[Recipe, ...]]]:
        """Each possible grid point once, with its recipes: settings that run the same recipes (a control
        the setting ignores, such as the calibration of float activations) and impossible ones are left out."""
        seen, out = set(), []
        for setting in self.grid():
            try:
                recipes = tuple(self.needs(setting))
            except WorkbenchError:  # an impossible setting (the widget shows why)
                continue
            if recipes not in seen:
                seen.add(recipes)
                out.append((setting, recipes))
        return out

    def static_grid(self) -> list[dict[str, Any]]:
        """The distinct grid points whose Results are all computed (in `results`)."""
        return [s for s, recipes in self.distinct_grid() if all(r in self.results for r in recipes)]

    def static_figure(self, *, row_height: int = 330) -> go.Figure:
        """The explorer's figures at every precomputed grid point, behind a slider: works with no kernel.

        Call ``precompute`` first: only grid points already computed become slider steps (nothing
        is trained here). The controls are put back afterwards.

        Example:
            >>> ex.precompute(); plots.show(ex.static_figure())
        """
        settings = self.static_grid()
        if not settings:
            raise WorkbenchError("no grid point is computed yet: call precompute() before static_figure()")
        saved = self.controls()
        steps: list[tuple[str, str, Sequence[go.Figure]]] = []
        self._quiet = True
        try:
            for setting in settings:
                self.set_controls(**setting)
                steps.append((self.label(setting), self.headline,
                              [go.Figure(getattr(self, name)) for row in self.PANELS for name in row]))
        finally:
            self.set_controls(**saved)
            self._quiet = False
        start = next((i for i, s in enumerate(settings) if s == saved), 0)
        return plots.slider_figure(steps, rows=[len(row) for row in self.PANELS], prefix=self.PREFIX,
                                   active=start, row_height=row_height)

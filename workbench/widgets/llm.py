"""The large-model explorer (chapter 12): weight bits x group size x method -> the small GPT's bits per
character against the bits each weight really takes, and the same prompt continued by the current model."""

from __future__ import annotations

import html
import math
import os
import time
from typing import Any, Iterable

import ipywidgets
import plotly.graph_objects as go

from .. import presets
from ..errors import WorkbenchError
from ..recipe import LMResult, Recipe, run
from ._render import render
from ._static import StaticTwin, product

__all__ = ["LLMExplorer", "recipe_for", "label", "FLOOR", "static_figure"]

# The y axis is the bits per character lost to quantization, on a log scale (the losses span four
# decades, from int8 to int2); a loss at or below FLOOR (int8, where the change is float noise, even
# a gain of 1e-4) is drawn at FLOOR, and the hover label says so.
FLOOR = 1e-4
_X_RANGE = (1.9, 40.0)  # bits per weight: int2 with small groups up to fp32
_METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ"}
_COLORS = {"rtn": "#1f77b4", "gptq": "#d62728", "awq": "#2ca02c"}
_SAMPLE_CHARS = 64  # of the continuation, in the static twin's title


def _group_name(group: int) -> str:
    return "per channel" if not group else f"g{group}"


def label(bits: int, group: int, method: str) -> str:
    """A grid point's name, e.g. "int4 g32 GPTQ" or "int3 per channel RTN"."""
    return f"int{bits} {_group_name(group)} {_METHOD_NAMES.get(method, method)}"


def recipe_for(base: Recipe, bits: int, group: int, method: str) -> Recipe:
    """The Recipe of one grid point: `base` (a dense GPT recipe) with weight-only quantization.

    With ``base = presets.LLM_BASE`` it is exactly ``presets.llm_quant(bits, group, method)``, so the
    explorer, the chapter and ``workbench bench --only llm`` share one cache.
    """
    if method not in _METHOD_NAMES:
        raise WorkbenchError(f"method must be one of {', '.join(_METHOD_NAMES)}, got {method!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise WorkbenchError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return base.dense().replace(weight_bits=bits, group_size=int(group), quant_method=method)


def _loss(result: LMResult) -> float:
    return max(result.delta_bpc, FLOOR)


def _one_line(text: str) -> str:
    return text.replace("\n", "\u23ce")  # a visible return sign: the title is one line of text


class LLMExplorer(StaticTwin):
    """Controls over weight bits x group size x method, drawing bits per character lost against bits per weight.

    Every control change builds the weight-only quantization :class:`Recipe` of the current point
    and runs it through :func:`workbench.recipe.run` (cached: the bench's ``llm`` group fills the
    whole grid, and a new point takes seconds). The panel draws every computed point in gray, one
    line per method across the bit widths at the current group size, fp32's and the unigram
    entropy's levels, and the current point as a star; `info` gives its numbers and the sampled
    continuation of :data:`workbench.recipe.lm.PROMPT` next to fp32's (same seed: the differences
    come from the weights).

    Args:
        base: the dense GPT recipe (default :data:`workbench.presets.LLM_BASE`, the chapter's model).
        cache: the result cache folder.
        bits, groups, methods: the grid of the controls (default the presets' LLM_BITS, LLM_GROUPS
            (0 = one scale per output channel), LLM_QUANT_METHODS). Each group size must divide the
            input width of every block Linear of `base`'s model (a smaller model needs smaller groups).

    Example:
        >>> ex = LLMExplorer(); ex.precompute(); ex       # in JupyterLab: the widget
        >>> plots.show(ex.static_figure())              # every grid point behind a slider, for the site
    """

    CONTROLS = ("bits", "group", "method")
    PANELS = (("curve",),)
    PREFIX = ""

    def __init__(self, base: Recipe | None = None, *, cache: str | os.PathLike | None = None,
                 bits: Iterable[int] = presets.LLM_BITS, groups: Iterable[int] = presets.LLM_GROUPS,
                 methods: Iterable[str] = presets.LLM_QUANT_METHODS) -> None:
        base = presets.LLM_BASE if base is None else base
        if not isinstance(base, Recipe) or base.model != "gpt":
            raise WorkbenchError(f"LLMExplorer needs a GPT Recipe (model='gpt'), got {base!r:.80}")
        self.base, self.cache = base.dense(), cache
        self.bit_widths, self.groups, self.methods = tuple(bits), tuple(groups), tuple(methods)
        for b in self.bit_widths:
            recipe_for(self.base, b, 0, "rtn")  # the error names what is allowed
        for m in self.methods:
            recipe_for(self.base, 8, 0, m)
        if not self.groups or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in self.groups):
            raise WorkbenchError(f"groups must be non-negative integers (0 = per channel), got {groups!r}")
        self.results: dict[Recipe, LMResult] = {}
        self.fp32 = self._run(self.base)
        self.last_seconds = 0.0
        self.headline = ""
        self.bits = ipywidgets.ToggleButtons(options=[(f"int{b}", b) for b in self.bit_widths],
                                             value=4 if 4 in self.bit_widths else self.bit_widths[0],
                                             description="bits")
        self.group = ipywidgets.ToggleButtons(options=[(_group_name(g), g) for g in self.groups],
                                              value=32 if 32 in self.groups else self.groups[0], description="scales")
        self.method = ipywidgets.ToggleButtons(options=[(_METHOD_NAMES[m], m) for m in self.methods],
                                               value="gptq" if "gptq" in self.methods else self.methods[0],
                                               description="method")
        self.info = ipywidgets.HTML()
        self.curve = go.Figure(self._traces(None))
        self.curve.update_layout(
            title="Bits per character lost vs bits per weight", height=420, width=760,
            xaxis=dict(title="bits per weight (packed codes + float32 scales)", type="log",
                       range=[math.log10(_X_RANGE[0]), math.log10(_X_RANGE[1])], tickvals=[2, 3, 4, 5, 6, 8, 16, 32]),
            yaxis=dict(title=f"bits/char lost vs fp32 (log; floor {FLOOR:g})", type="log"),
            margin=dict(l=70, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2))
        self._outputs = {"curve": ipywidgets.Output()}
        self.widget = ipywidgets.VBox([self.bits, self.group, self.method, self.info, self._outputs["curve"]])
        for control in (self.bits, self.group, self.method):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def recipe(self) -> Recipe:
        """The recipe of the current control values."""
        return recipe_for(self.base, self.bits.value, self.group.value, self.method.value)

    def _run(self, recipe: Recipe) -> LMResult:
        if recipe not in self.results:
            self.results[recipe] = run(recipe, cache=self.cache, progress=False)
        return self.results[recipe]

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer: bits x group sizes x methods (methods varying fastest)."""
        return product(bits=self.bit_widths, group=self.groups, method=self.methods)

    def needs(self, setting: Any) -> list[Recipe]:
        return [recipe_for(self.base, setting["bits"], setting["group"], setting["method"]), self.base]

    def label(self, setting: Any) -> str:
        return label(setting["bits"], setting["group"], setting["method"])

    # -- drawing: arranging LMResult fields, nothing measured here -------------------------------

    def _quantized(self) -> list[tuple[Recipe, LMResult]]:
        return [(r, res) for r, res in self.results.items() if r.weight_bits and not r.act_bits and r != self.base]

    def _traces(self, current: LMResult | None) -> list[go.Scatter]:
        done = self._quantized()
        group = self.group.value if hasattr(self, "group") else None
        fp32, unigram = self.fp32.val_bpc, self.fp32.unigram_bpc
        traces = [go.Scatter(
            x=[res.bits_per_weight for _, res in done], y=[_loss(res) for _, res in done], mode="markers",
            name="every computed point", marker=dict(size=7, color="lightgray"),
            text=[self._hover(r, res) for r, res in done], hovertemplate="%{text}<extra></extra>")]
        for m in self.methods:
            line = sorted((res.bits_per_weight, _loss(res), self._hover(r, res)) for r, res in done
                          if r.quant_method == m and r.group_size == group)
            traces.append(go.Scatter(x=[p[0] for p in line], y=[p[1] for p in line], text=[p[2] for p in line],
                                     mode="lines+markers", name=f"{_METHOD_NAMES[m]}, {_group_name(group)}",
                                     marker=dict(size=9, color=_COLORS.get(m)), line=dict(color=_COLORS.get(m)),
                                     hovertemplate="%{text}<extra></extra>"))
        traces.append(go.Scatter(x=list(_X_RANGE), y=[unigram - fp32] * 2, mode="lines",
                                 name=f"no context at all: unigram entropy {unigram:.3f} bits/char",
                                 line=dict(dash="dot", color="gray"), hoverinfo="skip"))
        traces.append(go.Scatter(x=[32.0], y=[FLOOR], mode="markers", name=f"fp32: {fp32:.3f} bits/char, 32 bits",
                                 marker=dict(size=11, symbol="square", color="black"), hoverinfo="name"))
        traces.append(go.Scatter(x=[current.bits_per_weight] if current else [], y=[_loss(current)] if current else [],
                                 mode="markers", name="current", marker=dict(size=18, symbol="star", color="gold",
                                                                             line=dict(color="black", width=1)),
                                 hoverinfo="skip"))
        return traces

    def _hover(self, r: Recipe, res: LMResult) -> str:
        floor = f" (drawn at {FLOOR:g})" if res.delta_bpc <= FLOOR else ""
        return (f"{label(r.weight_bits, r.group_size, r.quant_method)}<br>{res.val_bpc:.4f} bits/char, "
                f"{res.delta_bpc:+.4f} vs fp32{floor}<br>{res.bits_per_weight:.3f} bits/weight")

    def _draw(self, current: LMResult) -> None:
        new = self._traces(current)
        with self.curve.batch_update():
            for trace, src in zip(self.curve.data, new):
                trace.x, trace.y, trace.name = src.x, src.y, src.name
                if src.text is not None:
                    trace.text = src.text

    def _info_html(self, r: LMResult) -> str:
        fp = self.fp32
        rec = r.steps["quantize"]
        rows = [
            ("validation", f"{r.val_bpc:.4f} bits/char ({r.delta_bpc:+.4f} vs fp32 {fp.val_bpc:.4f}; "
                           f"unigram entropy {fp.unigram_bpc:.3f})"),
            ("block Linears", f"{r.bits_per_weight:.3f} bits/weight: {rec.code_bytes / 1024:,.1f} KB of codes + "
                              f"{rec.scale_bytes / 1024:,.1f} KB of scales = {r.weight_bytes / 1024:,.1f} KB, "
                              f"{r.fp32_weight_bytes / r.weight_bytes:.2f}x smaller than fp32"),
            ("", "from the cache" if r.cached else "computed now"),
        ]
        cells = "".join(f"<tr><td style='padding-right:1em'><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                        for k, v in rows)
        prompt = html.escape(r.samples["prompt"])
        pre = "style='white-space:pre-wrap;margin:0.2em 0;font-size:0.9em'"
        texts = (f"<p style='margin:0.4em 0 0'>The prompt continued (sampled, T = 0.8, the same seed):</p>"
                 f"<pre {pre}><b>this model:</b> <i>{prompt}</i>{html.escape(r.samples['sampled'])}</pre>"
                 f"<pre {pre}><b>fp32:</b> <i>{prompt}</i>{html.escape(fp.samples['sampled'])}</pre>")
        return f"<table>{cells}</table>{texts}"

    def update(self, change: Any = None) -> LMResult | None:
        """Run (or fetch) the current point and redraw; a WorkbenchError (a group size that does not divide a
        layer's width) is shown in red in `info` and the controls stay usable."""
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        t0 = time.perf_counter()
        try:
            result = self._run(self.recipe())
        except WorkbenchError as exc:
            self.info.value = f'<p style="color:#c62828"><b>Cannot run this setting:</b> {html.escape(str(exc))}</p>'
            self.headline = f"cannot run this setting: {exc}"
            self.last_seconds = time.perf_counter() - t0
            return None
        self._draw(result)
        self.info.value = self._info_html(result)
        r = result.recipe
        sample = _one_line(result.samples["sampled"])[:_SAMPLE_CHARS]
        self.headline = (f"{label(r.weight_bits, r.group_size, r.quant_method)}: {result.val_bpc:.4f} bits/char "
                         f"({result.delta_bpc:+.4f} vs fp32), {result.bits_per_weight:.2f} bits/weight<br>"
                         f"<i>{html.escape(result.samples['prompt'], quote=False)}</i>{html.escape(sample, quote=False)}...")
        if not self._quiet:
            render(self._outputs, self)
        self.last_seconds = time.perf_counter() - t0
        return result

    def precompute(self) -> list[LMResult]:
        """Run (or fetch) every grid point (bits x group sizes x methods), so the controls answer at once.

        Points a group size cannot run (it does not divide a layer's width) are left out.
        """
        out = []
        for setting in self.grid():
            try:
                out.append(self._run(self.needs(setting)[0]))
            except WorkbenchError:  # the widget says why when the controls reach it
                continue
        self.update()
        return out


def static_figure(explorer: LLMExplorer) -> go.Figure:
    """The explorer's static twin (:meth:`LLMExplorer.static_figure`): one slider step per computed grid point."""
    return explorer.static_figure()

"""The decoding explorer (chapter 13): context length x KV cache on/off x precision (torch fp32, ORT fp32,
ORT int4) -> tokens per second of one decoding step, from a grid measured once by :func:`measure_grid`.

Timings belong to the machine that took them, so the explorer measures nothing itself: it is given the
measurements (a JSON-able dict) and only draws them. The widget and its static twin draw with the same code
(:class:`~workbench.widgets._static.StaticTwin`), so the page shows exactly what the widget would.

Example:
    >>> m = measure_grid(t.model, fp32=og.OrtGPT("gpt.onnx"), int4=og.OrtGPT("gpt.int4.onnx"))
    >>> ex = DecodingExplorer(m); ex                      # in JupyterLab: the widget
    >>> plots.show(ex.static_figure())                    # every grid point behind a slider, for the site
"""

from __future__ import annotations

import html
import statistics
import time
from typing import Any, Callable, Iterable, Mapping

import ipywidgets
import plotly.graph_objects as go
import torch

from ..errors import WorkbenchError
from ..measure import torch_threads
from ..llm.gpt import GPT
from ._render import render
from ._static import StaticTwin, product

__all__ = ["DecodingExplorer", "measure_grid", "key", "LENGTHS", "PRECISIONS", "PRECISION_NAMES"]

LENGTHS = (32, 64, 128)
PRECISIONS = ("torch_fp32", "ort_fp32", "ort_int4")
PRECISION_NAMES = {"torch_fp32": "torch fp32", "ort_fp32": "ORT fp32", "ort_int4": "ORT int4"}
_COLORS = {"torch_fp32": "#1f77b4", "ort_fp32": "#2ca02c", "ort_int4": "#d62728"}
_CACHES = (True, False)


def key(precision: str, cache: bool, length: int) -> str:
    """The measurement's name in the JSON dict, e.g. ``"ort_int4|cache|64"`` or ``"torch_fp32|no-cache|128"``."""
    return f"{precision}|{'cache' if cache else 'no-cache'}|{int(length)}"


def _cache_name(cache: bool) -> str:
    return "KV cache" if cache else "no cache"


def _step_fns(engine: Any, ids: torch.Tensor) -> dict[bool, Callable[[], object]]:
    """The next-token computation at context length ``ids.shape[1]``: with the cache, one new position after
    ``L - 1`` cached ones (the cache is built here, untimed); without, the forward over all L positions."""
    n = ids.shape[1]
    _, past = engine.step(ids[:, :n - 1])
    last = ids[:, n - 1:]
    return {True: lambda: engine.step(last, past), False: lambda: engine(ids)}


@torch.no_grad()
def measure_grid(model: GPT, *, fp32: Any = None, int4: Any = None, lengths: Iterable[int] = LENGTHS,
                 repeats: int = 15, threads: int = 1, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time one decoding step at each context length, with and without the KV cache, for each engine given.

    At context length L the step with the cache runs one new token after L - 1 cached positions
    (``step(last, cache)``); without it, the model runs on all L tokens again (what generation without a cache
    does for every token). Every repeat times each (engine, cache) pair once, in a rotating order, after one
    untimed warm-up each; the median time gives tokens per second (1 / seconds per step).

    Args:
        model: the torch GPT (``torch_fp32``).
        fp32, int4: :class:`~workbench.llm.onnx_gpt.OrtGPT` sessions of the same model (``ort_fp32``,
            ``ort_int4``); left out when None.
        lengths: context lengths, each from 2 to the model's ``block_size``.
        repeats: timed steps per grid point (the median is kept).
        threads: torch's intra-op threads while timing (ORT sessions keep their own).
        seed: the random token ids of the context.
        clock: ``time.perf_counter`` (wall) or ``time.process_time``.

    Returns:
        A JSON-able dict: ``lengths``, ``precisions``, ``tokens_per_s`` (by :func:`key`), ``config`` (the
        GPTConfig), ``repeats``, ``threads``.

    Example:
        >>> m = measure_grid(t.model, fp32=og.OrtGPT("gpt.onnx")); m["tokens_per_s"][key("ort_fp32", True, 64)]
    """
    if not isinstance(model, GPT):
        raise WorkbenchError(f"measure_grid times a workbench.llm.GPT, got {type(model).__name__}")
    lengths = tuple(int(n) for n in lengths)
    block = model.config.block_size
    if not lengths or any(not 2 <= n <= block for n in lengths):
        raise WorkbenchError(f"lengths must be context lengths from 2 to the model's block_size {block}, got {lengths}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise WorkbenchError(f"repeats must be a positive integer, got {repeats!r}")
    engines = {"torch_fp32": model}
    for name, m in (("ort_fp32", fp32), ("ort_int4", int4)):
        if m is None:
            continue
        if getattr(m, "config", None) != model.config:
            raise WorkbenchError(f"{name} must be an OrtGPT of the same model (config {model.config}), "
                                 f"got {getattr(m, 'config', type(m).__name__)}")
        engines[name] = m
    was_training = model.training
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(seed))
    out: dict[str, float] = {}
    try:
        with torch_threads(threads):
            for n in lengths:
                fns = {key(p, c, n): fn for p, e in engines.items() for c, fn in _step_fns(e, ids[:, :n]).items()}
                names = list(fns)
                for fn in fns.values():
                    fn()
                seconds: dict[str, list[float]] = {k: [] for k in names}
                for r in range(repeats):
                    for j in range(len(names)):
                        k = names[(r + j) % len(names)]
                        t0 = clock()
                        fns[k]()
                        seconds[k].append(clock() - t0)
                out.update({k: 1.0 / max(statistics.median(s), 1e-9) for k, s in seconds.items()})
    finally:
        model.train(was_training)
    return {"lengths": list(lengths), "precisions": list(engines), "tokens_per_s": out,
            "config": model.config.to_dict(), "repeats": repeats, "threads": threads}


class DecodingExplorer(StaticTwin):
    """Controls over context length x KV cache x precision, drawing the measured tokens per second.

    The panel draws tokens per second against context length: one line per precision and cache setting
    (solid with the cache, dotted without; the current line's markers larger) and the current point as a
    star; `info` lists every precision and cache setting at the current length. Nothing is timed here: the
    numbers are those of `measurements`.

    Args:
        measurements: what :func:`measure_grid` returned (or the same dict read back from JSON).

    Example:
        >>> ex = DecodingExplorer(measure_grid(model, fp32=ort32, int4=ort4)); ex.set_controls(length=128, cache=False)
    """

    CONTROLS = ("length", "cache", "precision")
    PANELS = (("speed",),)
    PREFIX = ""

    def __init__(self, measurements: Mapping[str, Any]) -> None:
        try:
            self.lengths = tuple(int(n) for n in measurements["lengths"])
            self.precisions = tuple(measurements["precisions"])
            table = measurements["tokens_per_s"]
        except (KeyError, TypeError):
            raise WorkbenchError("measurements must be the dict measure_grid returns (lengths, precisions, "
                                 "tokens_per_s)") from None
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if unknown or not self.precisions or not self.lengths:
            raise WorkbenchError(f"precisions must be among {', '.join(PRECISIONS)}, got {list(self.precisions)}")
        missing = [key(p, c, n) for p in self.precisions for c in _CACHES for n in self.lengths
                   if key(p, c, n) not in table]
        if missing:
            raise WorkbenchError(f"the measurements lack {len(missing)} grid point(s), e.g. {missing[0]!r}; "
                                 "measure them with measure_grid")
        self.measurements = dict(measurements)
        # StaticTwin's results: one entry per grid point, keyed by (length, cache, precision)
        self.results: dict[Any, float] = {(n, c, p): float(table[key(p, c, n)])
                                          for p in self.precisions for c in _CACHES for n in self.lengths}
        self.headline = ""
        self.length = ipywidgets.ToggleButtons(options=[(str(n), n) for n in self.lengths], value=self.lengths[-1],
                                               description="context")
        self.cache = ipywidgets.ToggleButtons(options=[("KV cache", True), ("no cache", False)], value=True,
                                              description="cache")
        self.precision = ipywidgets.ToggleButtons(options=[(PRECISION_NAMES[p], p) for p in self.precisions],
                                                  value=self.precisions[-1], description="engine")
        self.info = ipywidgets.HTML()
        self.speed = go.Figure(self._traces())
        self.speed.update_layout(
            title="Decoding speed: one step at each context length", height=420, width=760,
            xaxis=dict(title="context length (tokens)", tickvals=list(self.lengths)),
            yaxis=dict(title="tokens per second (log)", type="log"),
            margin=dict(l=70, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2))
        self._outputs = {"speed": ipywidgets.Output()}
        self.widget = ipywidgets.VBox([self.length, self.cache, self.precision, self.info, self._outputs["speed"]])
        for control in (self.length, self.cache, self.precision):
            control.observe(self.update, names="value")
        self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- the grid, for the static twin (see StaticTwin) -----------------------------------------

    def grid(self) -> list[dict[str, Any]]:
        """Every setting the controls offer: lengths x cache x precisions (precisions varying fastest)."""
        return product(length=self.lengths, cache=_CACHES, precision=self.precisions)

    def needs(self, setting: Mapping[str, Any]) -> list[Any]:
        return [(setting["length"], setting["cache"], setting["precision"])]

    def label(self, setting: Mapping[str, Any]) -> str:
        return f"{setting['length']}, {_cache_name(setting['cache'])}, {PRECISION_NAMES[setting['precision']]}"

    # -- drawing: arranging the measurements, nothing timed here ---------------------------------

    def tokens_per_s(self, length: int, cache: bool, precision: str) -> float:
        """The measured tokens per second of one grid point."""
        return self.results[length, cache, precision]

    def _traces(self) -> list[go.Scatter]:
        cur = (self.cache.value, self.precision.value) if hasattr(self, "precision") else None
        traces = []
        for p in self.precisions:
            for c in _CACHES:
                ys = [self.results[n, c, p] for n in self.lengths]
                traces.append(go.Scatter(
                    x=list(self.lengths), y=ys, mode="lines+markers", name=f"{PRECISION_NAMES[p]}, {_cache_name(c)}",
                    line=dict(color=_COLORS[p], dash="solid" if c else "dot"),
                    marker=dict(size=[11 if cur == (c, p) else 6] * len(ys), color=_COLORS[p]),
                    text=[f"{PRECISION_NAMES[p]}, {_cache_name(c)}, context {n}: {y:,.0f} tokens/s"
                          for n, y in zip(self.lengths, ys)], hovertemplate="%{text}<extra></extra>"))
        if cur is None:
            star_x, star_y = [], []
        else:
            star_x, star_y = [self.length.value], [self.results[self.length.value, cur[0], cur[1]]]
        traces.append(go.Scatter(x=star_x, y=star_y, mode="markers", name="current",
                                 marker=dict(size=18, symbol="star", color="gold", line=dict(color="black", width=1)),
                                 hoverinfo="skip"))
        return traces

    def _draw(self) -> None:
        new = self._traces()
        with self.speed.batch_update():
            for trace, src in zip(self.speed.data, new):
                trace.x, trace.y, trace.name = src.x, src.y, src.name
                trace.marker.size = src.marker.size
                if src.text is not None:
                    trace.text = src.text

    def _info_html(self) -> str:
        n = self.length.value
        base = self.results[n, False, "torch_fp32"] if "torch_fp32" in self.precisions else None
        head = "".join(f"<th style='padding:0 0.8em'>{html.escape(PRECISION_NAMES[p])}</th>" for p in self.precisions)
        rows = []
        for c in _CACHES:
            cells = "".join(
                f"<td style='padding:0 0.8em;text-align:right'>{'<b>' if (c, p) == (self.cache.value, self.precision.value) else ''}"
                f"{self.results[n, c, p]:,.0f}{'</b>' if (c, p) == (self.cache.value, self.precision.value) else ''}</td>"
                for p in self.precisions)
            rows.append(f"<tr><td><b>{_cache_name(c)}</b></td>{cells}</tr>")
        note = (f"<p style='margin:0.3em 0 0;font-size:0.9em'>Tokens per second of one step with {n} tokens of "
                f"context, measured once on the machine that ran measure_grid "
                f"({self.measurements.get('threads', '?')} thread(s), median of {self.measurements.get('repeats', '?')})"
                + (f"; torch fp32 without the cache: {base:,.0f}" if base else "") + ".</p>")
        return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>{note}"

    def update(self, change: Any = None) -> float | None:
        """Redraw for the current controls; returns the current point's tokens per second."""
        if self._hold:  # set_controls is setting several controls: it calls update once at the end
            return None
        n, c, p = self.length.value, self.cache.value, self.precision.value
        tps = self.results[n, c, p]
        self._draw()
        self.info.value = self._info_html()
        ref = self.results.get((n, False, "torch_fp32"))
        vs = f" ({tps / ref:.2f}x torch fp32 without the cache)" if ref else ""
        self.headline = f"{PRECISION_NAMES[p]}, {_cache_name(c)}, context {n}: {tps:,.0f} tokens/s{vs}"
        if not self._quiet:
            render(self._outputs, self)
        return tps

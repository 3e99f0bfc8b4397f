"""Graders for the book's hands-on exercises: run the reader's function and the workbench's on the
same inputs and say, in one line, what is right or what is wrong.

``check`` never raises for anything the reader's function does (raising, returning ``None``,
returning the wrong type, shape or dtype, changing its input, running too long): it returns a
``Grade`` whose one-line ``str``/``repr``/HTML is what a notebook shows. ``strict=True`` (the
autograder's hidden tests) turns a failed grade into an ``AssertionError`` carrying that line. With
``strict`` left unset, the environment decides: ``WORKBENCH_GRADING_STRICT=1`` makes every grader
strict, which is how ``make book`` and ``make test`` prove that the book's own solutions (the
instructor edition) pass every grader, while a reader's notebook (variable unset) never raises.

Scoring: every case passes or fails. Values outside the tolerance on some cases earn partial
credit (the fraction of cases right); any other failure (raised, not yet solved, wrong type /
shape / dtype / keys / length, changed its input, timed out) scores 0 for the exercise.

Tolerances (floating point): an entry passes when ``|got - expected| <= atol + rtol * |expected|``
(``torch.isclose``'s rule; NaN equals NaN, inf equals inf of the same sign). The defaults are set
for float32 arithmetic done in a different but reasonable order: ``rtol = 1e-5`` (about 80 float32
ulps) and, unless ``atol`` is given, ``atol = 1e-6 * max(1, max |expected|)``, so the absolute slack
grows with the reference's magnitude and entries near zero are not held to a relative error.
Integer, bool and other non-float values are compared exactly.

Example:
    >>> from workbench import quant
    >>> from workbench.grading import case, check
    >>> def reference(x, *, bits):
    ...     qp = quant.compute_qparams(x, bits=bits, symmetric=False)
    ...     return qp.scale, qp.zero_point
    >>> check("scale_and_zero_point", my_scale_and_zero_point, reference,
    ...       [case(torch.randn(4, 8), bits=8), case(torch.randn(4, 8), bits=4)])
    ✓ scale_and_zero_point: 2/2 cases
"""

from __future__ import annotations

import copy
import dataclasses
import html
import inspect
import numbers
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import WorkbenchError

__all__ = ["STRICT_ENV", "DEFAULT_RTOL", "DEFAULT_ATOL", "FATAL", "Case", "CaseResult", "Grade", "case", "check",
           "enforce", "mismatch", "report", "total"]

STRICT_ENV = "WORKBENCH_GRADING_STRICT"
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6  # relative to max(1, max |expected|) when atol is not given
# Failure kinds that score 0 for the whole exercise; only "value" earns partial credit.
FATAL = frozenset({"not_solved", "none", "raised", "timeout", "type", "shape", "dtype", "device", "length", "keys",
                   "mutated", "compare_error", "reference_error"})
_MAX_CHARS = 320


@dataclass(frozen=True)
class Case:
    """One set of inputs: positional `args`, keyword `kwargs`, and an optional `label` for messages."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None


def case(*args: Any, label: str | None = None, **kwargs: Any) -> Case:
    """The inputs of one call, written as the call itself: ``case(x, bits=4)``.

    Example:
        >>> case(torch.randn(4, 8), bits=4, label="a 4-bit weight")
    """
    return Case(args=args, kwargs=kwargs, label=label)


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case: 1-based `index`, its `label`, `kind` ("ok" or a failure kind), `message`."""

    index: int
    label: str
    passed: bool
    kind: str
    message: str

    @property
    def headline(self) -> str:
        return f"case {self.index} ({self.label}): {self.message}" if self.label else f"case {self.index}: {self.message}"


@dataclass(frozen=True, repr=False)
class Grade:
    """The grade of one exercise; ``str(grade)`` is the one line a notebook shows.

    Args:
        name: the exercise.
        score: fraction in [0, 1] of the exercise's points earned.
        passed: every case right.
        message: one line: ``"6/6 cases"`` or what is wrong, in which case.
        details: one ``CaseResult`` per case.
        points: what the exercise is worth (``earned = score * points``).
    """

    name: str
    score: float
    passed: bool
    message: str
    details: tuple[CaseResult, ...] = ()
    points: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise WorkbenchError(f"a grade's score is a fraction in [0, 1], got {self.score!r}")

    @property
    def earned(self) -> float:
        return self.score * self.points

    def __str__(self) -> str:
        return f"{'✓' if self.passed else '✗'} {self.name}: {self.message}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        color = "#1a7f37" if self.passed else "#b35900" if self.score > 0 else "#cf222e"
        return f'<pre style="color:{color};margin:0;white-space:pre-wrap">{html.escape(str(self))}</pre>'


# ---- comparison -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Mismatch:
    kind: str
    text: str
    path: str


def _tname(obj: Any) -> str:
    if obj is None:
        return "None"
    t = type(obj)
    if isinstance(obj, torch.Tensor):
        return "torch.Tensor"
    if isinstance(obj, np.ndarray):
        return "numpy.ndarray"
    if isinstance(obj, np.generic):
        return f"numpy.{t.__name__}"
    return t.__name__ if t.__module__ == "builtins" else t.__qualname__


def _type_hint(got: Any, expected: Any) -> str:
    if got is None:
        return " (is a `return` missing?)"
    if isinstance(got, torch.Tensor) and isinstance(expected, numbers.Number):
        return " (.item() turns a one-element tensor into a Python number)"
    if isinstance(got, np.ndarray) and isinstance(expected, torch.Tensor):
        return " (torch.from_numpy turns it into a tensor)"
    if isinstance(got, torch.Tensor) and isinstance(expected, np.ndarray):
        return " (.numpy() turns it into an array)"
    if isinstance(got, list) and isinstance(expected, tuple):
        return " (return a tuple: `return a, b`)"
    return ""


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v)


def _where(idx: tuple) -> str:
    return f" at index {tuple(int(i) for i in idx)}" if idx else ""


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        return t.to(torch.complex128).numpy()
    if t.is_floating_point():
        return t.double().numpy()
    if t.dtype == torch.bool:
        return t.numpy()
    return t.long().numpy()


def _pattern(g: np.ndarray, e: np.ndarray) -> str:
    """A hint when the whole answer is off in one simple way: a constant offset or a constant factor."""
    if e.size < 2 or not (np.isfinite(g).all() and np.isfinite(e).all()):
        return ""
    d = g - e
    if np.allclose(d, d.flat[0], rtol=1e-4, atol=1e-9) and d.flat[0] != 0:
        return f"; got = expected {d.flat[0]:+.4g} everywhere"
    nz = e != 0
    if nz.sum() >= 2 and np.allclose(g[~nz], 0):
        r = g[nz] / e[nz]
        if np.allclose(r, r.flat[0], rtol=1e-4) and not np.isclose(r.flat[0], 1.0):
            return f"; got = {r.flat[0]:.4g} × expected everywhere"
    return ""


def _values(g: np.ndarray, e: np.ndarray, of: str, path: str, rtol: float, atol: float | None) -> _Mismatch | None:
    if e.dtype.kind in "fc":
        g, e = g.astype(np.result_type(e.dtype, np.float64)), e.astype(np.result_type(e.dtype, np.float64))
        finite = np.abs(e[np.isfinite(e)])
        tol_abs = DEFAULT_ATOL * max(1.0, float(finite.max()) if finite.size else 1.0) if atol is None else atol
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            diff = np.abs(g - e)
            ok = (g == e) | (np.isnan(g) & np.isnan(e)) | (diff <= tol_abs + rtol * np.abs(e))
            if ok.all():
                return None
            bad = ~ok
            if e.ndim == 0:
                return _Mismatch("value", _scalar_text(float(g), float(e), of, tol_abs, rtol), path)
            nan = bad & np.isnan(g)
            if nan.any():
                idx = np.unravel_index(int(np.argmax(nan)), e.shape)
                return _Mismatch("value", f"wrong values{of}: {int(nan.sum())} of {e.size} entries are NaN, first"
                                          f"{_where(idx)} (expected {_num(e[idx])}); a 0/0 or log(0) somewhere?", path)
            rank = np.where(bad, np.nan_to_num(diff, nan=np.inf, posinf=np.inf), -1.0)
            idx = np.unravel_index(int(np.argmax(rank)), e.shape)
            rel = np.where(bad & (e != 0), diff / np.abs(e), np.where(bad, np.inf, 0.0))
        text = (f"wrong values{of}: {int(bad.sum())} of {e.size} entries off; max abs error {_num(diff[idx])}"
                f"{_where(idx)} (got {_num(g[idx])}, expected {_num(e[idx])}), max rel error {_num(rel.max())}"
                f"{_pattern(g, e)}; tolerance {tol_abs:.2g} + {rtol:.2g}·|expected|")
        return _Mismatch("value", text, path)
    if e.dtype.kind in "biu":
        ok = g == e
        if ok.all():
            return None
        bad = ~ok
        idx = np.unravel_index(int(np.argmax(bad)), e.shape)
        text = f"wrong values{of}: {int(bad.sum())} of {e.size} entries differ, first{_where(idx)} " \
               f"(got {g[idx]}, expected {e[idx]})"
        if e.dtype.kind == "b":
            text += f"; got {int(g.sum())} True, expected {int(e.sum())}"
        else:
            gi, ei = g.astype(np.int64), e.astype(np.int64)
            text += f"; max abs error {int(np.abs(gi - ei).max())}{_pattern(gi.astype(float), ei.astype(float))}"
        return _Mismatch("value", text, path)
    equal = np.asarray(g == e, dtype=bool)
    if equal.all():
        return None
    idx = np.unravel_index(int(np.argmax(~equal)), e.shape)
    return _Mismatch("value", f"wrong values{of}: {int((~equal).sum())} of {e.size} entries differ, first"
                              f"{_where(idx)} (got {g[idx]!r}, expected {e[idx]!r})", path)


def _scalar_text(g: float, e: float, of: str, tol_abs: float, rtol: float) -> str:
    ratio = f", got/expected = {g / e:.4g}" if e and np.isfinite(g) and np.isfinite(e) else ""
    return (f"wrong value{of}: got {g:.6g}, expected {e:.6g} (abs error {abs(g - e):.6g}{ratio}; "
            f"tolerance {tol_abs:.2g} + {rtol:.2g}·|expected|)")


def _diff(got: Any, exp: Any, path: str, rtol: float, atol: float | None) -> _Mismatch | None:
    of = f" of {path}" if path else ""
    child = path or "output"

    def wrong_type(expected_name: str) -> _Mismatch:
        return _Mismatch("type", f"wrong type{of}: got {_tname(got)}, expected {expected_name}"
                                 f"{_type_hint(got, exp)}", path)

    if isinstance(exp, (torch.Tensor, np.ndarray)):
        is_torch = isinstance(exp, torch.Tensor)
        if not isinstance(got, type(exp)):
            return wrong_type("torch.Tensor" if is_torch else "numpy.ndarray")
        if tuple(got.shape) != tuple(exp.shape):
            return _Mismatch("shape", f"wrong shape{of}: got {tuple(got.shape)}, expected {tuple(exp.shape)}", path)
        if got.dtype != exp.dtype:
            return _Mismatch("dtype", f"wrong dtype{of}: got {got.dtype}, expected {exp.dtype}", path)
        if is_torch and got.device != exp.device:
            return _Mismatch("device", f"wrong device{of}: got {got.device}, expected {exp.device}", path)
        return _values(_as_numpy(got) if is_torch else got, _as_numpy(exp) if is_torch else exp, of, path,
                       rtol, atol)
    if isinstance(exp, nn.Module):
        if not isinstance(got, nn.Module):
            return wrong_type(f"a torch module ({_tname(exp)})")
        return _diff(dict(got.state_dict()), dict(exp.state_dict()), f"{child}.state_dict()", rtol, atol)
    if isinstance(exp, (bool, np.bool_)):
        if not isinstance(got, (bool, np.bool_)):
            return wrong_type("bool")
        return None if bool(got) == bool(exp) else _Mismatch("value", f"wrong value{of}: got {got}, expected {exp}",
                                                             path)
    if isinstance(exp, numbers.Integral):
        if isinstance(got, (bool, np.bool_)) or not isinstance(got, numbers.Integral):
            return wrong_type("int")
        if int(got) == int(exp):
            return None
        return _Mismatch("value", f"wrong value{of}: got {got}, expected {exp} (off by {int(got) - int(exp):+d})", path)
    if isinstance(exp, numbers.Real):
        if isinstance(got, (bool, np.bool_)) or not isinstance(got, numbers.Real):
            return wrong_type("float")
        g, e = float(got), float(exp)
        tol_abs = DEFAULT_ATOL * max(1.0, abs(e) if np.isfinite(e) else 1.0) if atol is None else atol
        if g == e or (np.isnan(g) and np.isnan(e)) or abs(g - e) <= tol_abs + rtol * abs(e):
            return None
        return _Mismatch("value", _scalar_text(g, e, of, tol_abs, rtol), path)
    if dataclasses.is_dataclass(exp) and not isinstance(exp, type):
        if type(got) is not type(exp):
            return wrong_type(_tname(exp))
        for f in dataclasses.fields(exp):
            m = _diff(getattr(got, f.name), getattr(exp, f.name), f"{child}.{f.name}", rtol, atol)
            if m:
                return m
        return None
    if isinstance(exp, Mapping):
        if not isinstance(got, Mapping):
            return wrong_type("dict")
        missing = [k for k in exp if k not in got]
        extra = [k for k in got if k not in exp]
        if missing or extra:
            parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + \
                    ([f"unexpected {', '.join(map(repr, extra))}"] if extra else [])
            return _Mismatch("keys", f"wrong keys{of}: {'; '.join(parts)}", path)
        for k in exp:
            m = _diff(got[k], exp[k], f"{child}[{k!r}]", rtol, atol)
            if m:
                return m
        return None
    if isinstance(exp, (tuple, list)):
        if not isinstance(got, type(exp)):
            return wrong_type(_tname(exp))
        if len(got) != len(exp):
            return _Mismatch("length", f"wrong length{of}: got {len(got)} items, expected {len(exp)}", path)
        for i, (g_item, e_item) in enumerate(zip(got, exp)):
            m = _diff(g_item, e_item, f"{child}[{i}]", rtol, atol)
            if m:
                return m
        return None
    try:
        equal = bool(got == exp)
    except Exception:  # noqa: BLE001 - an object whose == fails is simply not equal
        equal = False
    if equal:
        return None
    if type(got) is not type(exp):
        return wrong_type(_tname(exp))
    return _Mismatch("value", f"wrong value{of}: got {_short(got)}, expected {_short(exp)}", path)


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 1] + "…"


def mismatch(got: Any, expected: Any, *, rtol: float = DEFAULT_RTOL, atol: float | None = None) -> str | None:
    """The first difference between `got` and `expected`, in one line, or None when they agree.

    Compares tensors and arrays (type, shape, dtype, device, then values), Python numbers, bools,
    tuples, lists, dicts, dataclasses and modules (by ``state_dict``), recursively. A building
    block for a custom ``compare`` hook.

    Example:
        >>> mismatch(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
        'wrong dtype: got torch.float32, expected torch.float64'
    """
    m = _diff(got, expected, "", rtol, atol)
    return None if m is None else m.text


# ---- running a case ---------------------------------------------------------------------------------------

class _TimedOut(BaseException):
    """Raised by the alarm inside the reader's function (a BaseException so `except Exception` cannot eat it)."""


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    # SIGALRM only exists on Unix and only reaches the main thread (where a Jupyter kernel runs cells);
    # elsewhere the limit is skipped rather than faked.
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _TimedOut

    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]  # someone else's alarm (pytest-timeout), restored after
    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 1] + "…"


def _raised(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = f"raised {type(err).__name__}" + (f": {lines[0]}" if lines else "")
    # Point at the reader's own line: the last frame outside installed packages and this file.
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "site-packages" not in f.filename and f.filename != __file__]
    if frames:
        text += f" (line {frames[-1].lineno} of {frames[-1].name})"
    return text


def _as_case(item: Any) -> Case:
    if isinstance(item, Case):
        return item
    if isinstance(item, tuple):
        return Case(args=item)
    if isinstance(item, Mapping):
        return Case(kwargs=dict(item))
    return Case(args=(item,))


def _named_inputs(fn: Callable, c: Case) -> list[tuple[str, Any]]:
    """(name, value) of each positional then keyword input, positional ones named after `fn`'s parameters."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    star = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    names = [positional[i] if i < len(positional) else f"{star}[{i - len(positional)}]" if star else f"arg{i}"
             for i in range(len(c.args))]
    return list(zip(names, c.args)) + list(c.kwargs.items())


def _describe(name: str, v: Any) -> str:
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return f"{name} of shape {tuple(v.shape)}"
    if isinstance(v, nn.Module):
        return f"{name}: {type(v).__name__}"
    if v is None or isinstance(v, (bool, int, float, str, np.generic)):
        return f"{name}={v!r}"
    r = repr(v)
    if len(r) <= 30:
        return f"{name}={r}"
    return f"{name}: {_tname(v)}" + (f" of {len(v)}" if hasattr(v, "__len__") else "")


def _copy(v: Any) -> tuple[Any, bool]:
    try:
        return copy.deepcopy(v), True
    except Exception:  # noqa: BLE001 - e.g. a non-leaf tensor; share it and skip the mutation check
        return v, False


def _copies(c: Case) -> tuple[tuple, dict, bool]:
    args = [_copy(a) for a in c.args]
    kwargs = {k: _copy(v) for k, v in c.kwargs.items()}
    ok = all(done for _, done in args) and all(done for _, done in kwargs.values())
    return tuple(a for a, _ in args), {k: v for k, (v, _) in kwargs.items()}, ok


def _run_case(index: int, student_fn: Callable, reference_fn: Callable, c: Case, *, rtol: float,
              atol: float | None, compare: Callable | None, inplace: bool, timeout: float | None) -> CaseResult:
    named = _named_inputs(reference_fn, c)
    label = _one_line(c.label if c.label else ", ".join(_describe(n, v) for n, v in named))

    def result(kind: str, message: str) -> CaseResult:
        return CaseResult(index, label, kind == "ok", kind, _one_line(message))

    r_args, r_kwargs, _ = _copies(c)
    try:
        ref_out = reference_fn(*r_args, **r_kwargs)
    except Exception as err:  # noqa: BLE001 - reported as the exercise's fault, never raised at the reader
        return result("reference_error", f"the reference solution {_raised(err)}; this is a fault in the exercise, "
                                         "not in your answer")
    s_args, s_kwargs, copied = _copies(c)
    try:
        with _time_limit(timeout):
            out = student_fn(*s_args, **s_kwargs)
    except _TimedOut:
        return result("timeout", f"took longer than {timeout:g} s (an endless loop, or a loop over every entry "
                                 "where one tensor operation would do?)")
    except NotImplementedError:
        return result("not_solved", "not yet solved (it raises NotImplementedError)")
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the reader's error becomes the grade's message
        return result("raised", _raised(err))
    if out is Ellipsis:
        return result("not_solved", "not yet solved (it returns ...)")
    if out is None and ref_out is not None:
        # Kind "none": "not yet solved" when every case returns None, a missing `return` on some path otherwise.
        return result("none", f"wrong type: got None, expected {_tname(ref_out)} (is a `return` missing?)")

    inputs = list(zip([n for n, _ in named], c.args + tuple(c.kwargs.values()), s_args + tuple(s_kwargs.values()),
                      r_args + tuple(r_kwargs.values())))
    if copied and not inplace:
        for name, original, after, _ in inputs:
            m = _diff(after, original, name, 0.0, 0.0)
            if m:
                fix = f"{name}.clone()" if isinstance(original, torch.Tensor) else f"copy.deepcopy({name})"
                return result("mutated", f"changed its input {m.path} in place; leave the input as it is "
                                         f"(work on a copy, e.g. {fix}, or use out-of-place operations)")
    if compare is not None:
        try:
            verdict = compare(out, ref_out)
        except Exception as err:  # noqa: BLE001
            return result("compare_error", f"could not check the answer: the checker {_raised(err)}")
        if verdict is None or verdict is True:
            problem = None
        else:
            problem = _Mismatch("value", "wrong answer" if verdict is False else str(verdict), "")
    else:
        problem = _diff(out, ref_out, "", rtol, atol)
    if problem is None and inplace:
        for name, _, after, ref_after in inputs:
            problem = _diff(after, ref_after, name, rtol, atol)
            if problem:
                break
    return result("ok", "right") if problem is None else result(problem.kind, problem.text)


def check(name: str, student_fn: Callable | None, reference_fn: Callable, cases: Sequence[Any], *,
          rtol: float = DEFAULT_RTOL, atol: float | None = None, compare: Callable[[Any, Any], Any] | None = None,
          points: float = 1.0, inplace: bool = False, timeout: float | None = None, strict: bool | None = None) -> Grade:
    """Grade the reader's `student_fn` against `reference_fn` on each case; return the `Grade`.

    Each case is run on deep copies of its inputs, so neither function can change what the other
    sees; unless ``inplace=True``, a reader's function that changes its input fails.

    Args:
        name: the exercise, as the reader sees it in the message.
        student_fn: the reader's function (``None`` or ``...`` counts as not yet solved).
        reference_fn: the workbench's answer, called the same way.
        cases: ``case(...)`` objects; a bare tuple is the positional args, a dict the keyword
            args, anything else one positional arg.
        rtol, atol: float tolerance (see the module docstring; ``atol=None`` scales with the
            reference's magnitude). Integers and bools are compared exactly.
        compare: optional ``compare(got, expected)`` returning None/True (right), False, or a
            one-line message (wrong); ``mismatch`` is a good building block.
        points: what the exercise is worth in ``report``/``total``.
        inplace: the exercise asks to change the inputs in place: compare the inputs after the
            call (reader's against reference's) as well as the return values.
        timeout: seconds allowed per case (Unix, main thread; skipped elsewhere).
        strict: raise ``AssertionError`` with the one line when the grade is not full marks;
            ``None`` (the default) reads ``WORKBENCH_GRADING_STRICT`` (``1``: strict).
            (for the instructor edition's tests).

    Returns:
        The ``Grade``; in a notebook it displays as its one line.

    Example:
        >>> check("cosine_lr", my_cosine_lr, reference_cosine_lr, [case(t, base_lr=0.1, total_steps=10) for t in range(12)])
        ✓ cosine_lr: 12/12 cases
    """
    if not isinstance(name, str) or not name:
        raise WorkbenchError(f"an exercise needs a non-empty name, got {name!r}")
    if not callable(reference_fn):
        raise WorkbenchError(f"the reference of exercise {name!r} must be a function, got {_tname(reference_fn)}")
    cases = [_as_case(c) for c in cases]
    if not cases:
        raise WorkbenchError(f"exercise {name!r} has no cases to check; give at least one case(...)")
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not points > 0:
        raise WorkbenchError(f"points must be a number > 0, got {points!r}")
    if rtol < 0 or (atol is not None and atol < 0):
        raise WorkbenchError(f"tolerances must be >= 0, got rtol={rtol!r}, atol={atol!r}")
    if timeout is not None and not timeout > 0:
        raise WorkbenchError(f"timeout must be a number of seconds > 0 (or None for no limit), got {timeout!r}")

    if student_fn is None or student_fn is Ellipsis:
        grade = Grade(name, 0.0, False, "not yet solved: write the function and run its cell again", (), float(points))
    elif not callable(student_fn):
        grade = Grade(name, 0.0, False, f"expected a function, got {_tname(student_fn)} (pass the function itself, "
                                        "without calling it)", (), float(points))
    else:
        results = tuple(_run_case(i, student_fn, reference_fn, c, rtol=rtol, atol=atol, compare=compare,
                                  inplace=inplace, timeout=timeout) for i, c in enumerate(cases, 1))
        grade = _grade(name, results, float(points))
    return enforce(grade, strict)


def enforce(result: Any, strict: bool | None) -> Any:
    """Return `result` (anything with ``.passed``), or raise ``AssertionError`` with its text when it
    did not pass and `strict` says so (``None``: ``WORKBENCH_GRADING_STRICT=1``). Shared by every grader."""
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "") == "1"
    if strict and not result.passed:
        raise AssertionError(str(result))
    return result


def _grade(name: str, results: tuple[CaseResult, ...], points: float) -> Grade:
    n, right = len(results), sum(r.passed for r in results)
    if right == n:
        return Grade(name, 1.0, True, f"{n}/{n} cases", results, points)
    if all(r.kind in ("not_solved", "none") for r in results):
        kind = results[0].kind
        reason = "(it returns None)" if kind == "none" else results[0].message.removeprefix("not yet solved ")
        return Grade(name, 0.0, False, f"not yet solved {reason}: write your code in the function and run its "
                                       "cell again", results, points)
    fatal = [r for r in results if not r.passed and r.kind in FATAL]
    if fatal:
        return Grade(name, 0.0, False, fatal[0].headline, results, points)
    first = next(r for r in results if not r.passed)
    suffix = f" [{right}/{n} cases right]" if right else ""
    return Grade(name, right / n, False, _one_line(first.headline) + suffix, results, points)


# ---- summaries --------------------------------------------------------------------------------------------

def total(grades: Iterable[Grade]) -> tuple[float, float]:
    """``(points earned, points possible)`` over `grades`.

    Example:
        >>> total([check(...), check(...)])
        (1.5, 2.0)
    """
    grades = list(grades)
    return sum(g.earned for g in grades), sum(g.points for g in grades)


def _pts(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def report(grades: Iterable[Grade]) -> str:
    """A small plain-text table: one row per exercise (points, the one line), then the total.

    Example:
        >>> print(report(grades))
        exercise              points  result
        scale_and_zero_point     1/1  ✓ 6/6 cases
        ...
    """
    grades = list(grades)
    if not grades:
        return "no exercises graded yet"
    width = max(len("exercise"), len("total"), *(len(g.name) for g in grades))
    cells = [f"{_pts(g.earned)}/{_pts(g.points)}" for g in grades]
    earned, possible = total(grades)
    total_cell = f"{_pts(earned)}/{_pts(possible)}"
    pw = max(len("points"), len(total_cell), *(len(c) for c in cells))
    lines = [f"{'exercise':<{width}}  {'points':>{pw}}  result"]
    lines += [f"{g.name:<{width}}  {c:>{pw}}  {'✓' if g.passed else '✗'} {g.message}" for g, c in zip(grades, cells)]
    lines.append(f"{'total':<{width}}  {total_cell:>{pw}}  {earned / possible:.0%}")
    return "\n".join(lines)

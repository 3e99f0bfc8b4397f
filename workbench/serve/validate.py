"""Validation of /predict bodies: every way a body can be wrong becomes a status and a one-line message."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .app import ServeSettings
    from .models import LoadedModel

__all__ = ["BadInput", "check_content_type", "parse_inputs"]


class BadInput(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def check_content_type(value: str | None) -> None:
    """Raise a 415 :class:`BadInput` unless a /predict body is declared as JSON (or not declared at all).

    A missing Content-Type is accepted (``curl --data-binary`` and raw sockets send none); a declared form, text or
    XML body is refused, which also keeps a browser's no-preflight cross-site POST (text/plain, forms) out.
    """
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise BadInput(415, f"the body is declared as {media or 'nothing'!r}; send JSON with the header "
                            f"Content-Type: application/json")


def _reject_constant(name: str) -> float:
    raise BadInput(422, f"inputs must be finite numbers; the body contains {name}")


def parse_inputs(body: bytes, model: "LoadedModel", settings: "ServeSettings") -> np.ndarray:
    """Validate a /predict body and return float32 inputs of shape (N, *model.input_shape).

    Raises :class:`BadInput` with the status and a one-line message for every way the body can be wrong.
    """
    try:
        text = body.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259); the scan for booleans below relies on it
        payload = json.loads(text, parse_constant=_reject_constant)
    except BadInput:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(400, f"the body is not valid JSON ({str(exc).splitlines()[0][:120]}); "
                             f'send {{"inputs": [[...], ...]}}') from None
    except RecursionError:  # ~2 KB of [[[[... exhausts the parser's stack: the client's mistake, not a 500
        raise BadInput(400, f"the body's JSON is nested too deeply; a body here nests at most "
                             f'{len(model.input_shape) + 1} lists: {{"inputs": [example, ...]}} with examples of '
                             f"shape {list(model.input_shape)}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadInput(422, 'expected a JSON object {"inputs": [example, ...]} with one example per row')
    unknown = sorted(set(payload) - {"inputs"})
    if unknown:
        raise BadInput(422, f"unknown field(s) {', '.join(map(repr, unknown))}; the body has only 'inputs'")
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise BadInput(422, f"'inputs' must be a list of examples, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise BadInput(422, "empty batch: 'inputs' must hold at least one example")
    if len(inputs) > settings.max_rows:
        raise BadInput(413, f"a batch of {len(inputs)} examples is more than this server's limit of "
                             f"{settings.max_rows}; split it into several requests")
    try:
        arr = np.asarray(inputs)
    except ValueError:
        raise BadInput(422, "'inputs' must be a rectangular array of numbers (all examples of the same shape)") \
            from None
    if arr.dtype == object and all(type(v) in (int, float) for v in arr.ravel()):
        # JSON integers of any size are numbers; those past int64 make numpy fall back to Python objects.
        try:
            arr = arr.astype(np.float64)
        except OverflowError:  # beyond float64, so beyond float32 too: reported as such below
            arr = np.full(arr.shape, np.inf)
    if arr.dtype.kind not in "iuf":
        what = {"b": "true/false", "U": "strings", "O": "nulls, objects or mixed types"}.get(arr.dtype.kind,
                                                                                          str(arr.dtype))
        raise BadInput(422, f"'inputs' must hold only numbers, got {what}")
    if "true" in text or "false" in text:
        # numpy turns [true, 1.5] into [1.0, 1.5]. Here every leaf is a number or a boolean and no string but the
        # key 'inputs' is left, so these bytes can only be JSON booleans among the numbers.
        raise BadInput(422, "'inputs' must hold only numbers, got true/false among them")
    shape, flat = model.input_shape, math.prod(model.input_shape)
    if arr.shape[1:] == shape:
        pass
    elif arr.ndim == 2 and arr.shape[1] == flat:
        arr = arr.reshape(len(arr), *shape)
    else:
        raise BadInput(422, f"each example must have shape {list(shape)} (or {flat} numbers in a flat list); "
                             f"got a batch of shape {list(arr.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
        raise BadInput(422, f"inputs must be finite float32 numbers; example {int(np.argmax(bad))} holds "
                             f"NaN, infinity or a value beyond +-3.4e38")
    return x

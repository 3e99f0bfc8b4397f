"""The on-disk result cache: keys, atomic entries, and the lookup of a run already measured.

An entry is a folder ``<cache>/results/<key>/`` with ``result.json``, ``model.pt`` and
``model.onnx``, published with one rename so that a reader never sees half of one. The key hashes
the settings of the recipe's *active* steps (see :mod:`workbench.recipe.steps`), the model, the
data and the versions of the code that measured it: a step that is off does not enter the key, so
adding a step (off by default) leaves every cached result valid, and a change of the measuring
code (``RESULT_VERSION``) makes every old entry miss and be recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..store import publish_dir
from .result import Result, _versions
from .settings import Recipe
from . import steps as _steps

__all__ = ["key", "key_settings", "read", "publish", "measured_twin", "model_fingerprint"]


def model_fingerprint(model: nn.Module) -> str:
    """A user model's identity for the key: its architecture (repr) and its weights."""
    h = hashlib.sha256(repr(model).encode())
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    h.update(buf.getvalue())
    return h.hexdigest()


def key_settings(recipe: Recipe) -> dict[str, Any]:
    """The settings that decide the result: every field of every step the recipe turns on."""
    d = recipe.to_dict()
    out = {f: d[f] for s in _steps.STEPS if s.active(recipe) for f in s.fields}
    if recipe.teacher is not None:
        out["teacher"] = key_settings(recipe.teacher)
    return out


def key(recipe: Recipe, model_id: str, data_id: str) -> str:
    blob = json.dumps({"recipe": key_settings(recipe), "model": model_id, "data": data_id, "versions": _versions()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read(entry: Path, recipe: Recipe) -> Result | None:
    """The cached Result in `entry` (for `recipe`, whose inactive settings may differ), or None."""
    try:
        stored = json.loads((entry / "result.json").read_text())
        # The key proved the settings equal; the stored recipe is not parsed (an inactive step's
        # settings may differ, and a recipe type with more steps may not parse as the base one).
        hit = Result.from_dict({**stored, "recipe": recipe}, cached=True)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"ignoring a damaged cache entry {entry} ({type(exc).__name__}); recomputing it", stacklevel=3)
        return None
    return _localize(hit, entry)


def _localize(result: Result, entry: Path) -> Result:
    """Paths are stored relative to the entry (the cache may move); hand them out absolute."""
    return dataclasses.replace(result, checkpoint_path=str(entry / "model.pt"),
                               onnx_path=str(entry / "model.onnx") if result.onnx_path else None)


def publish(root: Path, key_: str, recipe: Recipe, fill: Callable[[Path], Result]) -> Result:
    """Measure into a temporary folder with `fill(folder)`, write its result.json, publish it atomically."""

    def fill_entry(tmp: Path) -> Result:
        result = fill(tmp)
        (tmp / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        return result

    result = publish_dir(root, key_, fill_entry, is_complete=lambda entry: read(entry, recipe) is not None)
    return _localize(result, root / key_)


def measured_twin(recipe: Recipe, model_id: str, data_id: str, root: Path) -> Result | None:
    """The cached run that trained exactly like `recipe` with the default measurement settings, if any."""
    defaults = {f.name: f.default for f in dataclasses.fields(recipe) if f.name in _steps.fields_of("measure")}
    twin = recipe.replace(**defaults)
    if twin == recipe:
        return None
    return read(root / key(twin, model_id, data_id), twin)

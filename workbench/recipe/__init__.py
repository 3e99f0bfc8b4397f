"""The one pipeline: a `Recipe` of plain settings goes through `run` and comes back as a measured `Result`.

- :mod:`~workbench.recipe.settings`: `Recipe`, the frozen settings;
- :mod:`~workbench.recipe.steps`: the ordered table of steps that every Recipe field belongs to
  (its fields, validation, apply and typed record); `COMPRESSION_FIELDS`, `Recipe.dense()`,
  `Recipe.compressed` and the cache key are derived from it;
- :mod:`~workbench.recipe.result`: `Result`, what a run measured, and `load_model`;
- :mod:`~workbench.recipe.cache`: the on-disk cache (keys, atomic entries);
- :mod:`~workbench.recipe.pipeline`: `run` and `sweep`;
- :mod:`~workbench.recipe.lm`: what `run` does for a language model (``model="gpt"``): `LMResult`.

Results are cached on disk under a key that hashes the settings of the recipe's active steps, the
model and the data (and the versions of the code that measured them), so a sweep that was computed
once answers at once. Every face of the project (CLI, widgets, benchmarks, book) goes through `run`.
"""

from ..store import cache_dir
from .lm import LMResult
from .pipeline import run, sweep
from .result import RESULT_VERSION, Result, load_model
from .settings import Recipe
from .steps import (CALIBRATION_IMAGES, COMPRESSION_FIELDS, CORPORA, LANGUAGE_MODELS, MEASUREMENT_FIELDS,
                    ORT_QUANT_MODES, PRUNE_KINDS, PRUNE_METHODS, PRUNE_SCHEDULES, PRUNE_SCOPES, QUANT_METHODS,
                    SENSITIVITY_GRID, STEPS, Step, fields_of)

__all__ = ["Recipe", "Result", "LMResult", "run", "sweep", "load_model", "cache_dir", "RESULT_VERSION", "STEPS", "Step", "fields_of",
           "COMPRESSION_FIELDS", "MEASUREMENT_FIELDS", "PRUNE_KINDS", "PRUNE_SCOPES", "PRUNE_SCHEDULES",
           "ORT_QUANT_MODES", "SENSITIVITY_GRID", "CALIBRATION_IMAGES", "LANGUAGE_MODELS", "CORPORA",
           "PRUNE_METHODS", "QUANT_METHODS"]

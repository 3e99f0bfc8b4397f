"""workbench: compress, optimize and deploy deep-learning models, measured by the book's own code.

The public API in one line: ``run(Recipe(...)) -> Result``; the modules hold each technique.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import (cluster, coding, data, distill, fold, llm, measure, models, onnx, ort, plots, presets,  # noqa: E402
               prune, quant, recipe, schedules, sparse, train)
from .data import Dataset, load  # noqa: E402
from .errors import WorkbenchError  # noqa: E402
from .models import build  # noqa: E402
from .recipe import Recipe, Result, run, sweep  # noqa: E402
from .train import evaluate, fit  # noqa: E402

__all__ = [
    "__version__",
    "cluster",
    "coding",
    "data",
    "distill",
    "fold",
    "llm",
    "measure",
    "models",
    "onnx",
    "ort",
    "plots",
    "presets",
    "prune",
    "quant",
    "recipe",
    "schedules",
    "sparse",
    "train",
    "Dataset",
    "load",
    "WorkbenchError",
    "build",
    "Recipe",
    "Result",
    "run",
    "sweep",
    "evaluate",
    "fit",
]

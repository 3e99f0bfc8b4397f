"""Shared helpers of the serving tests (no tests here): small trained models and fresh registries, made once."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from workbench.recipe import Recipe, run

# Small enough to train in about a second; 3 epochs beat 1 epoch on the test split.
GOOD = Recipe(model="mlp", dataset="digits", epochs=3, latency_repeats=20)
WEAK = GOOD.replace(epochs=1)
NAME = "digits-mlp"


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="workbench-serve-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def results():
    """(good, weak) Results, trained once into a private cache."""
    import torch

    cache = workdir() / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only fight over a shared machine's cores
    try:
        return run(GOOD, cache=cache, progress=False), run(WEAK, cache=cache, progress=False)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _template() -> Path:
    """An empty MLflow database, made once: creating the tables (alembic) takes seconds, copying it none."""
    import workbench.serve  # noqa: F401  (switches MLflow's telemetry off before it is imported)
    from mlflow import MlflowClient

    root = workdir() / "template"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # creates the tables
    return root / "mlflow.db"


def fresh_registry(root: Path):
    """A new, empty registry in `root` (a copy of the template database, with its own artifact folder)."""
    from workbench.serve.registry import Registry

    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template(), root / "mlflow.db")
    return Registry(root=root)

"""Serving and the model lifecycle: an MLflow registry, an ONNX Runtime server with dynamic batching,
Prometheus metrics, hot swaps, a load generator and the update loop (chapter 10).

The heavy pieces (MLflow, FastAPI) are imported by the submodules that need them, so that
``import workbench.serve`` stays cheap:

* :mod:`workbench.serve.registry`  -- ``Registry``: register, list, promote, rollback, load (sha256-checked)
* :mod:`workbench.serve.app`       -- ``create_app``: the FastAPI server (routes, metrics, hot swap)
* :mod:`workbench.serve.models`    -- ``LoadedModel`` and where it comes from (registry alias or file)
* :mod:`workbench.serve.validate`  -- ``parse_inputs``: every bad /predict body becomes a clear 4xx
* :mod:`workbench.serve.batching`  -- ``DynamicBatcher``: requests arriving together run as one ORT batch
* :mod:`workbench.serve.process`   -- ``ServerProcess``: the server as a child process on 127.0.0.1
* :mod:`workbench.serve.loadtest`  -- closed-loop and open-loop load generation to 127.0.0.1
* :mod:`workbench.serve.monitor`   -- scrape ``/metrics`` or run a local Prometheus and query it
* :mod:`workbench.serve.lifecycle` -- the update loop: challenger vs champion on the same data
* :mod:`workbench.serve.bench`     -- ``serving_figures``: the measured figures of the chapter
* :mod:`workbench.serve.cli`       -- ``workbench serve`` and ``workbench registry list|promote|rollback``
"""

from __future__ import annotations

import os

__all__ = ["quiet_mlflow", "require_extra", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"  # this machine only; a container passes --host 0.0.0.0
DEFAULT_PORT = 8000


def require_extra() -> None:
    """Raise a one-line WorkbenchError if the ``serve`` extra (MLflow, FastAPI, ...) is not installed."""
    import importlib.util

    from ..errors import WorkbenchError

    missing = [m for m in ("mlflow", "fastapi", "uvicorn", "prometheus_client", "httpx", "sqlalchemy", "alembic")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise WorkbenchError(f"serving needs {', '.join(missing)}: pip install 'workbench[serve]'")


def quiet_mlflow() -> None:
    """Switch MLflow's telemetry off (no network at run time) and silence its progress bars.

    Called before MLflow is imported anywhere in the workbench; respects values the user set.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


quiet_mlflow()

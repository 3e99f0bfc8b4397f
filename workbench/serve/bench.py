"""The serving chapter's measured figures: batched vs unbatched throughput, p99 at a fixed rate, a swap under load.

Everything runs for real on this machine: a temporary MLflow registry, the server in child processes
on 127.0.0.1, the load generator in this process. The model is chapter 2's MLP on digits (fp32) and
its ONNX Runtime dynamic int8 variant.

Run with ``workbench bench --only serving`` (or ``serving_figures()``).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any, Callable

import httpx

from ..errors import WorkbenchError
from .app import ROUTES, ServeSettings
from .loadtest import LoadResult, closed_loop, open_loop, payloads_from
from .process import ServerProcess

__all__ = ["MODEL_NAME", "serving", "serving_figures", "swap_under_load", "register_pair"]

MODEL_NAME = "digits-mlp"
CONCURRENCY = 32
OPEN_LOOP_RATE = 200.0
ROUND_SECONDS = 2.0
ROUNDS = 3


def _recipe():
    from ..presets import BASELINES

    return BASELINES["mlp_digits"]





def register_pair(registry: Any, *, cache: Any = None, progress: bool | None = None) -> tuple[Any, Any]:
    """Train (or fetch) the MLP and its ONNX Runtime dynamic int8 version, register both; fp32 becomes the champion.

    Returns:
        (fp32 version, int8 version) as :class:`~workbench.serve.registry.ModelVersion`.
    """
    from ..recipe import run

    fp32 = run(_recipe(), cache=cache, progress=progress)
    int8 = run(_recipe().replace(ort_quant="dynamic"), cache=cache, progress=progress)
    v1 = registry.register_result(fp32, name=MODEL_NAME, alias=None, description="MLP on digits, fp32")
    registry.promote(MODEL_NAME, v1.version)
    v2 = registry.register_result(int8, name=MODEL_NAME, description="MLP on digits, ORT dynamic int8")
    return registry.get(MODEL_NAME, v1.version), v2


def swap_under_load(server: ServerProcess, swap: Callable[[], Any], payloads: list[bytes], *,
                    concurrency: int = 8, duration_s: float = 3.0, swap_at_s: float | None = None,
                    api_key: str | None = None) -> tuple[LoadResult, float]:
    """Run a closed-loop load and call `swap()` (e.g. promote + reload) in the middle of it.

    Returns:
        The load result (its ``versions`` count answers per model version) and when the swap
        happened, in seconds from the start of the measured load.
    """
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["result"] = closed_loop(server.url + ROUTES["predict"], payloads, concurrency=concurrency,
                                        duration_s=duration_s, api_key=api_key, warmup_s=0.0)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=load, name="swap-load")
    t0 = time.perf_counter()
    thread.start()
    time.sleep(swap_at_s if swap_at_s is not None else duration_s / 2)
    swapped_at = time.perf_counter() - t0
    try:
        swap()
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"], swapped_at


def _reload(server: ServerProcess, api_key: str | None = None) -> dict:
    r = httpx.post(server.url + ROUTES["reload"], headers={"X-API-Key": api_key} if api_key else {}, timeout=30)
    if r.status_code != 200:
        raise WorkbenchError(f"reload failed: {r.json().get('detail', r.text)}")
    return r.json()


def _row(name: str, r: LoadResult, **extra: Any) -> dict[str, Any]:
    return {"name": name, **r.to_dict(), **extra}


def serving(*, cache: Any = None, progress: bool | None = None) -> tuple[list[dict], dict[str, float]]:
    """The bench group ``serving``: rows of load runs and the chapter's figures."""
    from .. import data as _data
    from .registry import Registry

    if cache is True:
        cache = None
    recipe = _recipe()
    ds = _data.load(recipe.dataset, seed=recipe.seed)
    bodies = payloads_from(ds.X_test, rows=1, count=128)
    rows: list[dict] = []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="workbench-serve-bench-") as tmp:
        reg = Registry(root=tmp)
        v1, v2 = register_pair(reg, cache=cache, progress=progress)
        batched = ServerProcess(f"{MODEL_NAME}@champion", registry_uri=reg.uri,
                                settings=ServeSettings(max_batch=CONCURRENCY, max_wait_ms=2.0, poll_seconds=0))
        unbatched = ServerProcess(f"{MODEL_NAME}/{v1.version}", registry_uri=reg.uri,
                                  settings=ServeSettings(max_batch=1, poll_seconds=0))
        with batched, unbatched:
            # Interleaved rounds, so that a change in the machine's load lands on both equally.
            runs: dict[str, list[LoadResult]] = {"batched": [], "unbatched": []}
            for _ in range(ROUNDS):
                for name, server in (("batched", batched), ("unbatched", unbatched)):
                    runs[name].append(closed_loop(server.url + ROUTES["predict"], bodies, concurrency=CONCURRENCY,
                                                  duration_s=ROUND_SECONDS))
            rps = {name: sum(r.ok for r in rs) / sum(r.duration_s for r in rs) for name, rs in runs.items()}
            for name, rs in runs.items():
                rows += [_row(f"fp32_{name}_c{CONCURRENCY}_round{i}", r, max_batch=CONCURRENCY
                              if name == "batched" else 1) for i, r in enumerate(rs)]
            figures["serve_batched_rps"] = rps["batched"]
            figures["serve_unbatched_rps"] = rps["unbatched"]
            figures["serve_batched_over_unbatched_rps"] = rps["batched"] / rps["unbatched"]
            errors = sum(r.errors for rs in runs.values() for r in rs)

            fixed = open_loop(batched.url + ROUTES["predict"], bodies, rate=OPEN_LOOP_RATE, duration_s=3.0, seed=0)
            rows.append(_row(f"fp32_open_loop_{OPEN_LOOP_RATE:.0f}rps", fixed))
            errors += fixed.errors
            figures["serve_p99_ms"] = fixed.p99_ms
            figures["serve_p50_ms"] = fixed.p50_ms
            figures["serve_p99_rate_rps"] = OPEN_LOOP_RATE

            def swap() -> None:
                reg.promote(MODEL_NAME, v2.version)
                _reload(batched)

            during, _ = swap_under_load(batched, swap, bodies, concurrency=8, duration_s=3.0)
            rows.append(_row("swap_fp32_to_int8_under_load", during))
            figures["swap_failed_requests"] = float(during.errors)
            figures["swap_requests"] = float(during.requests)
            figures["swap_versions_seen"] = float(len(during.versions))

            int8 = closed_loop(batched.url + ROUTES["predict"], bodies, concurrency=CONCURRENCY,
                               duration_s=ROUND_SECONDS)
            rows.append(_row(f"int8_batched_c{CONCURRENCY}", int8, max_batch=CONCURRENCY))
            errors += int8.errors
            figures["serve_int8_batched_rps"] = int8.rps
            figures["serve_errors"] = float(errors)
    for row in rows:
        row["machine_cores"] = os.cpu_count()
    return rows, figures


def serving_figures(*, cache: Any = True, progress: bool | None = None) -> dict[str, Any]:
    """``{"rows": [...], "figures": {...}}`` of the serving group (the keys the issue names are in figures).

    Example:
        >>> serving_figures()["figures"]["serve_batched_over_unbatched_rps"]
    """
    rows, figures = serving(cache=None if cache is True else cache, progress=progress)
    return {"rows": rows, "figures": figures}

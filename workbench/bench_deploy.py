"""Bench group "deploy" (chapters 7-8): torch eager vs ONNX Runtime fp32 / int8 dynamic / int8 static QDQ, and BN folding.

Two models large enough to leave the CPU caches: a Linear-heavy MLP 784-1024-1024-10 and the
CNN of chapter 3 (2 conv + 2 fc, with BN), both on digits28. For each, at batch 1 and 64, the four
runtimes are timed side by side in interleaved rounds in one process (one thread each), so every
ratio compares numbers taken under the same machine load. Accuracy is on the test split, each
int8 model's own. Run it with ``workbench bench --only deploy``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch

from . import bars, fold
from . import onnx as wonnx
from .data import load
from .measure import side_by_side, torch_threads
from .presets import DEPLOY_MODELS
from .recipe import Result, run

__all__ = ["BATCHES", "RUNTIMES", "deploy_figures", "runtime_latencies"]

BATCHES = (1, 64)
RUNTIMES = ("torch eager fp32", "ORT fp32", "ORT int8 dynamic", "ORT int8 static QDQ")
# Which int8 mode is the right one per family (what ort.quantize(mode="auto") picks).
RECOMMENDED = {"mlp": "dynamic", "cnn": "static"}


def runtime_latencies(results: dict[str, Result], model: torch.nn.Module, x: torch.Tensor, *,
                      rounds: int = 5, repeats: int | None = None) -> dict[str, Any]:
    """p50 latency stats of the four runtimes on batch `x`, interleaved (one thread each).

    Args:
        results: ``{"fp32": Result, "dynamic": Result, "static": Result}`` (ONNX files of each).
        model: the fp32 PyTorch model.
        x: the batch.
    """
    arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    sessions = {name: wonnx.session(results[key].onnx_path, threads=1)
                for name, key in zip(RUNTIMES[1:], ("fp32", "dynamic", "static"))}
    fns: dict[str, Callable[[], Any]] = {}
    model.eval()

    def eager() -> Any:
        with torch.inference_mode():
            return model(x)

    fns[RUNTIMES[0]] = eager
    for name, sess in sessions.items():
        fns[name] = lambda s=sess: s.run(None, {"input": arr})
    with torch_threads(1):
        reps = repeats or (100 if len(x) == 1 else 15)
        return side_by_side(fns, rounds=rounds, repeats=reps, warmup=5, threads=1, batch_size=len(x))


def _bn_fold(results: dict[str, Result], x: torch.Tensor) -> tuple[dict[str, float], list[dict[str, Any]]]:
    model = results["fp32"].load_model().eval()
    folded = fold.fold_bn(model)
    data = load(results["fp32"].recipe.dataset, seed=results["fp32"].recipe.seed)
    with torch.inference_mode():
        err = float((folded(data.X_test) - model(data.X_test)).abs().max())
    with torch_threads(1), torch.inference_mode():
        stats = side_by_side({"with BN": lambda: model(x), "folded": lambda: folded(x)}, rounds=5, repeats=20,
                             threads=1, batch_size=len(x))
    figures = {"bn_fold_max_abs_err": err, "bn_fold_speedup": stats["with BN"].p50_us / stats["folded"].p50_us}
    rows = [{"name": f"cnn_bn_{k.replace(' ', '_')}", "model": "cnn", "batch": len(x), "runtime": f"torch eager ({k})",
             "p50_us": s.p50_us, "bn_layers": len(fold.batchnorm_layers(model if k == "with BN" else folded))}
            for k, s in stats.items()]
    return figures, rows


def deploy_figures(*, cache: str | os.PathLike | None = True, progress: bool | None = None) -> dict[str, Any]:
    """Measure the deploy group: rows per (model, batch, runtime) and the issue's figures.

    Args:
        cache: the result cache folder; True (or None) for the default (:func:`workbench.recipe.cache_dir`).
        progress: training progress bars for models not yet in the cache.

    Returns:
        ``{"rows": [...], "figures": {...}}`` with figures ``ort_int8_size_ratio`` (MLP, dynamic),
        ``ort_int8_size_ratio_cnn`` (static), ``ort_int8_dynamic_speedup_mlp_b1`` / ``_b64``,
        ``ort_int8_static_speedup_mlp_b1`` / ``_b64``, ``ort_int8_static_speedup_cnn_b1`` / ``_b64``,
        ``ort_int8_dynamic_speedup_cnn_b1`` / ``_b64``, ``ort_vs_torch_speedup_<model>_b<batch>``,
        ``ort_int8_acc_drop_pp_mlp`` / ``_cnn`` (recommended mode) and ``ort_int8_acc_drop_pp``
        (the larger of the two), ``bn_fold_max_abs_err`` and ``bn_fold_speedup`` (torch eager,
        CNN, batch 64). Speedups are ORT fp32 p50 / ORT int8 p50.

    Example:
        >>> report = deploy_figures(); report["figures"]["ort_int8_static_speedup_cnn_b64"]
    """
    cache = None if cache is True else cache
    rows: list[dict[str, Any]] = []
    figures: dict[str, float] = {}
    for name, recipe in DEPLOY_MODELS.items():
        results = {"fp32": run(recipe, cache=cache, progress=progress)}
        for mode in ("dynamic", "static"):
            results[mode] = run(recipe.replace(ort_quant=mode), cache=cache, progress=progress)
        model = results["fp32"].load_model()
        data = load(recipe.dataset, seed=recipe.seed)
        accuracy = {RUNTIMES[0]: results["fp32"].accuracy, RUNTIMES[1]: results["fp32"].accuracy,
                    RUNTIMES[2]: results["dynamic"].accuracy, RUNTIMES[3]: results["static"].accuracy}
        size = {RUNTIMES[0]: None, RUNTIMES[1]: results["fp32"].size_onnx_bytes,
                RUNTIMES[2]: results["dynamic"].size_onnx_bytes, RUNTIMES[3]: results["static"].size_onnx_bytes}
        for batch in BATCHES:
            # 15 interleaved rounds: with 5 the static CNN ratio ranged 1.27-1.76 over three runs.
            stats = runtime_latencies(results, model, data.X_test[:batch], rounds=15)
            ort_fp32 = stats[RUNTIMES[1]].p50_us
            for runtime, s in stats.items():
                rows.append({"name": f"{name}_b{batch}_{runtime.replace(' ', '_')}", "model": name, "batch": batch,
                             "runtime": runtime, "p50_us": s.p50_us, "p90_us": s.p90_us, "p99_us": s.p99_us,
                             "per_example_us": s.p50_us / batch, "speedup_vs_ort_fp32": ort_fp32 / s.p50_us,
                             "accuracy": accuracy[runtime], "onnx_bytes": size[runtime], "threads": 1,
                             "params": results["fp32"].params, "macs": results["fp32"].macs})
            figures[f"ort_int8_dynamic_speedup_{name}_b{batch}"] = ort_fp32 / stats[RUNTIMES[2]].p50_us
            figures[f"ort_int8_static_speedup_{name}_b{batch}"] = ort_fp32 / stats[RUNTIMES[3]].p50_us
            figures[f"ort_vs_torch_speedup_{name}_b{batch}"] = stats[RUNTIMES[0]].p50_us / ort_fp32
        best = results[RECOMMENDED[name]]
        figures[f"ort_int8_acc_drop_pp_{name}"] = bars.drop_pp(results["fp32"], best)
        figures[f"ort_int8_size_ratio_{name}"] = results["fp32"].size_onnx_bytes / best.size_onnx_bytes
        if name == "cnn":
            fold_figures, fold_rows = _bn_fold(results, data.X_test[:64])
            figures.update(fold_figures)
            rows += fold_rows
    figures["ort_int8_size_ratio"] = figures.pop("ort_int8_size_ratio_mlp")
    figures["ort_int8_acc_drop_pp"] = max(figures["ort_int8_acc_drop_pp_mlp"], figures["ort_int8_acc_drop_pp_cnn"])
    return {"rows": rows, "figures": figures}

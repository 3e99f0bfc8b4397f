"""The distributed chapter's measured figures: equivalence proofs, bubble, ring bytes, compression (bench group).

Each function launches one torchrun job on this machine (gloo on CPU) and returns what the
chapter plots; :func:`distributed_figures` runs them all for ``workbench bench``. The settings
are module constants, so the notebook, the bench and the tests measure the same thing.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable


from workbench.data import load
from workbench.models import load_checkpoint

from .ddp import DDPConfig, initial_model, train_single
from .launch import launch
from .pipeline import PipeConfig, bubble_formula

__all__ = ["EQUIVALENCE", "COMPRESSION", "COMPRESSION_HOOKS", "PIPELINE", "RING_SIZES", "ddp_equivalence",
           "pipeline_run", "ring_run", "compression_run", "compression_summary", "distributed_figures"]

# DDP vs one process: plain SGD (see ddp_equivalence), 40 steps of 2 x 32 examples.
EQUIVALENCE = DDPConfig(epochs=2, max_steps=40, lr=0.05, momentum=0.0)
# Compression: the same run under each hook; momentum SGD, as PowerSGD's authors train.
COMPRESSION = DDPConfig(epochs=8, lr=0.05, momentum=0.9, powersgd_rank=4, topk_ratio=0.01)
COMPRESSION_HOOKS = ("allreduce", "fp16", "powersgd", "topk")
# Micro-batches of 256 rows: each stage's compute per micro-batch (~20 ms forward) dwarfs the
# fixed cost of a message and of waking its receiver. With 64-row micro-batches (batch 512) the
# measured GPipe bubble ranged 0.15-0.25 over quiet runs against a formula of 0.111; with 256, 0.13-0.14.
PIPELINE = PipeConfig(hidden=1024, depth=5, batch_size=2048, micro_batches=8, repeats=7)
RING_SIZES = (1, 7, 1000, 1_000_003)

Progress = bool | Callable[[str], None] | None


def ddp_equivalence(cfg: DDPConfig = EQUIVALENCE, *, nprocs: int = 2, progress: Progress = None) -> dict[str, Any]:
    """Train `cfg` with DDP on `nprocs` processes, then the same steps in this process; compare the weights.

    Plain SGD (no momentum) keeps the check tight: both sides are exactly the same computation in
    real arithmetic, and differ only by float rounding (the gradient average is summed in a
    different order); momentum would carry each step's rounding into later steps as well.

    Returns:
        ``max_param_diff`` (max |DDP - single| over all weights), ``max_param_change`` (how far the
        weights moved from the start: the check is not vacuous), the ranks' results.

    Example:
        >>> ddp_equivalence()["max_param_diff"] <= 1e-6  # doctest: +SKIP
        True
    """
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ddp.pt"
        results = launch("workbench.distributed.ddp", nprocs, cfg.to_args() + ["--out", str(ckpt)], progress=progress)
        ddp_model, _ = load_checkpoint(ckpt)
    data = load(cfg.dataset, seed=cfg.seed)
    single = train_single(cfg, nprocs, data)
    initial = initial_model(cfg, data).state_dict()
    diff = max(float((a - b).abs().max()) for a, b in zip(ddp_model.state_dict().values(),
                                                          single.state_dict().values()))
    moved = max(float((p - initial[n]).abs().max()) for n, p in single.state_dict().items())
    return {"max_param_diff": diff, "max_param_change": moved, "steps": results[0]["runs"][cfg.hook]["steps"],
            "results": results}


def pipeline_run(cfg: PipeConfig = PIPELINE, *, nprocs: int = 2, progress: Progress = None) -> dict[str, Any]:
    """Both pipeline schedules on `nprocs` stages: gradients vs one process, bubble measured vs formula."""
    results = launch("workbench.distributed.pipeline", nprocs, cfg.to_args(), progress=progress)
    summary = {"max_grad_diff": max(r["max_grad_diff"] for r in results),
               "bubble_formula": bubble_formula(nprocs, cfg.micro_batches), "results": results}
    for kind in ("gpipe", "1f1b"):
        # Each step's idle share averaged over the ranks, median over the timed steps (same on every rank).
        summary[f"{kind}_bubble"] = results[0][kind]["bubble_measured"]
        summary[f"{kind}_makespan_ms"] = 1e3 * results[0][kind]["makespan_s"]
        summary[f"{kind}_peak_in_flight"] = [r[kind]["peak_in_flight"] for r in results]
    return summary


def ring_run(sizes: tuple[int, ...] = RING_SIZES, *, nprocs: int = 2, progress: Progress = None) -> dict[str, Any]:
    """The hand-written ring all-reduce vs ``dist.all_reduce``: max error, bytes sent vs 2(p-1)/p x size."""
    results = launch("workbench.distributed.allreduce", nprocs, ["--sizes", ",".join(map(str, sizes))],
                     progress=progress)
    largest = max(sizes)
    ratios = [row["bytes_ratio"] for r in results for row in r["sizes"] if row["numel"] == largest]
    return {"max_err": max(row["max_abs_err"] for r in results for row in r["sizes"]),
            "bytes_ratio": statistics.mean(ratios), "results": results}


def compression_run(cfg: DDPConfig = COMPRESSION, hooks: tuple[str, ...] = COMPRESSION_HOOKS, *, nprocs: int = 2,
                    progress: Progress = None) -> dict[str, dict[str, Any]]:
    """Train `cfg` once per communication hook (same start, same data); rank 0's results by hook."""
    results = launch("workbench.distributed.ddp", nprocs, cfg.to_args(list(hooks)), progress=progress)
    return results[0]["runs"]


def compression_summary(runs: dict[str, dict[str, Any]], baseline: str = "allreduce") -> list[dict[str, Any]]:
    """One row per hook: bytes sent per rank, compression ratio vs `baseline`, final accuracy and its drop."""
    base = runs[baseline]
    return [{"hook": hook, "sent_MB": run["comm"]["sent_bytes"] / 1e6,
             "bytes_ratio": base["comm"]["sent_bytes"] / run["comm"]["sent_bytes"],
             "final_test_acc": run["final_test_acc"],
             "acc_drop_pp": 100 * (base["final_test_acc"] - run["final_test_acc"]),
             "train_seconds": run["train_seconds"]} for hook, run in runs.items()]


def distributed_figures(*, cache: str | os.PathLike | None = None,
                        progress: bool | None = None) -> tuple[list[dict], dict[str, float]]:
    """The bench group "distributed": four torchrun jobs of 2 processes on this machine (about a minute).

    Args:
        cache: accepted for the bench-group signature and unused: these figures are measurements
            of this machine now (timings, bytes) and are always taken afresh.
        progress: stream the ranks' progress lines (None: unless CI or WORKBENCH_PROGRESS=0).

    Returns:
        ``(rows, figures)``: rows describe each measurement; figures are ``ddp_max_param_diff``,
        ``pipeline_max_grad_diff``, ``ring_allreduce_max_err`` (each <= 1e-6),
        ``pipeline_bubble_measured`` and ``pipeline_bubble_formula`` (GPipe, m=8, p=2),
        ``ring_allreduce_bytes_ratio`` (measured / 2(p-1)/p x size), ``powersgd_bytes_ratio``
        (uncompressed / PowerSGD bytes) and ``powersgd_acc_drop_pp``.
    """
    del cache
    eq = ddp_equivalence(progress=progress)
    pipe = pipeline_run(progress=progress)
    ring = ring_run(progress=progress)
    comp = compression_summary(compression_run(progress=progress))
    by_hook = {row["hook"]: row for row in comp}
    figures = {
        "ddp_max_param_diff": eq["max_param_diff"],
        "pipeline_max_grad_diff": pipe["max_grad_diff"],
        "ring_allreduce_max_err": ring["max_err"],
        "pipeline_bubble_measured": pipe["gpipe_bubble"],
        "pipeline_bubble_formula": pipe["bubble_formula"],
        "pipeline_bubble_excess": pipe["gpipe_bubble"] - pipe["bubble_formula"],
        "ring_allreduce_bytes_ratio": ring["bytes_ratio"],
        "powersgd_bytes_ratio": by_hook["powersgd"]["bytes_ratio"],
        "powersgd_acc_drop_pp": by_hook["powersgd"]["acc_drop_pp"],
    }
    rows = [{"name": "ddp_equivalence", "steps": eq["steps"], "max_param_diff": eq["max_param_diff"],
             "max_param_change": eq["max_param_change"]}]
    rows += [{"name": f"pipeline_{kind}", "bubble_measured": pipe[f"{kind}_bubble"],
              "bubble_formula": pipe["bubble_formula"], "makespan_ms": pipe[f"{kind}_makespan_ms"],
              "peak_in_flight": pipe[f"{kind}_peak_in_flight"]} for kind in ("gpipe", "1f1b")]
    rows += [{"name": f"ring_allreduce_{row['numel']}", **{k: v for k, v in row.items() if k != "numel"},
              "numel": row["numel"]} for row in ring["results"][0]["sizes"]]
    rows += [{"name": f"ddp_hook_{row['hook']}", **row} for row in comp]
    return rows, figures

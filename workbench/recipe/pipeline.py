"""`run`: one recipe end to end (build, train, apply the steps of the table, export, measure); `sweep`: many."""

from __future__ import annotations

import copy
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as _data
from .. import distill, measure, models, prune, quant, schedules, sparse
from .. import onnx as _onnx
from ..errors import WorkbenchError
from ..store import cache_dir
from ..train import evaluate, fit, show_progress
from . import cache as _cache
from .lm import LMResult, run_lm
from .result import Result, _versions
from .settings import Recipe
from . import steps as _steps
from .steps import Context

__all__ = ["run", "sweep"]


def _float_model(qnet: nn.Module) -> nn.Module:
    """The float model inside a fake-quantized one (weights as trained, not snapped to the grid)."""
    plain = copy.deepcopy(qnet)
    for name, m in list(plain.named_modules()):
        if isinstance(m, quant.FakeQuantLayer):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, m.layer)
    return plain


def _apply_steps(ctx: Context, phase: str, records: dict[str, Any]) -> None:
    """Apply the recipe's active compression steps of `phase`, in the table's order."""
    for step in _steps.STEPS:
        if step.kind == "compress" and step.apply is not None and step.phase == phase and step.active(ctx.recipe):
            records[step.name] = step.apply(ctx)


def _measure(ctx: Context, entry: Path, key: str, builtin: bool, history: dict, records: dict[str, Any],
             train_seconds: float, dense_accuracy: float | None, teacher_accuracy: float | None) -> Result:
    """Evaluate, export (and apply the ONNX steps), measure; the files go into the (temporary) entry."""
    recipe, ds = ctx.recipe, ctx.data
    net = ctx.net
    ctx.test, ctx.val, ctx.entry = evaluate(net, ds.X_test, ds.y_test), evaluate(net, ds.X_val, ds.y_val), entry
    x1 = ds.X_test[:1]
    ckpt = entry / "model.pt"
    quantized = any(isinstance(m, quant.FakeQuantLayer) for m in net.modules())
    if builtin:
        # Structured pruning changed the widths; the checkpoint records them so it can be rebuilt.
        widths = models.width_options(_float_model(net)) if quantized else models.width_options(net)
        folded = {"batchnorm": False} if recipe.fold_bn and recipe.model == "cnn" else {}
        spec = {"name": recipe.model, "input_shape": ds.input_shape, "num_classes": ds.num_classes,
                "options": recipe.options | widths | folded}
        models.save_checkpoint(ckpt, net, spec=spec, metadata={"recipe": recipe.to_dict(), "accuracy": ctx.test.accuracy})
    else:
        torch.save({"state_dict": net.state_dict()}, ckpt)
    onnx_path = parity = ort_lat = None
    if recipe.export_onnx:
        onnx_path = _onnx.export(net, entry / "model.onnx", input_shape=ds.input_shape)
        _apply_steps(ctx, "onnx", records)
        parity = _onnx.parity(net, onnx_path, ds.X_test)
        ort_lat = _onnx.ort_latency(onnx_path, x1, threads=recipe.threads, repeats=recipe.latency_repeats)
    test, val = ctx.test, ctx.val
    plain = _float_model(net) if quantized else net
    sizes = (sparse.model_sparse_sizes(plain)["total"]
             if any(isinstance(m, prune.PRUNABLE) for m in plain.modules()) else None)
    share = records.get("share")
    return Result(
        recipe=recipe, key=key, accuracy=test.accuracy, test_correct=test.correct, test_n=test.n,
        val_accuracy=val.accuracy, test_loss=test.loss,
        params=measure.count_params(net), nonzero_params=measure.count_nonzero(net),
        macs=measure.macs(net, ds.input_shape).total, size_state_dict_bytes=measure.state_dict_bytes(net),
        size_onnx_bytes=measure.file_bytes(onnx_path) if onnx_path else None,
        onnx_max_abs_err=parity.max_abs_err if parity else None,
        onnx_top1_agreement=parity.top1_agreement if parity else None,
        latency_torch_b1=measure.torch_latency(net, x1, threads=recipe.threads, repeats=recipe.latency_repeats),
        latency_ort_b1=ort_lat, sparsity=prune.sparsity(plain), layer_sparsity=prune.layer_sparsity(plain),
        size_quantized_bytes=quant.packed_bytes(net) if quantized else None,
        layer_sqnr=quant.layer_sqnr(net) if quantized else {},
        size_encoded_bytes=share.encoded_bytes if share is not None else None,
        sparse_bytes={"dense": sizes.dense, "csr": sizes.csr, "bitmask": sizes.bitmask,
                      "relative": sizes.relative} if sizes else {},
        dense_accuracy=dense_accuracy, teacher_accuracy=teacher_accuracy, history=history, steps=records,
        train_seconds=train_seconds,
        checkpoint_path="model.pt", onnx_path="model.onnx" if onnx_path else None,
        versions=_versions(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def run(recipe: Recipe, *, data: _data.Dataset | None = None, model: nn.Module | None = None,
        cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool | None = None) -> Result | LMResult:
    """Run one recipe end to end: build (or take) the model, train, apply its steps, evaluate, measure, export.

    A language-model recipe (``model="gpt"``) runs :func:`workbench.recipe.lm.run_lm` and returns an
    :class:`~workbench.recipe.lm.LMResult` (bits per character instead of accuracy).

    Args:
        recipe: the settings.
        data: a loaded dataset; default ``workbench.data.load(recipe.dataset, seed=recipe.seed)``.
        model: your own ``nn.Module`` instead of the zoo's ``recipe.model`` (it is copied, not
            modified; its architecture and weights enter the cache key).
        cache: the cache folder (see :func:`workbench.recipe.cache_dir`).
        use_cache: False recomputes (and refreshes the cache entry).
        progress: show training progress bars (None: on unless CI / WORKBENCH_PROGRESS=0).

    Returns:
        The :class:`Result`; ``result.cached`` says whether it came from the cache.

    Example:
        >>> res = run(Recipe(model="mlp", epochs=30)); print(res.accuracy, res.size_onnx_bytes)
    """
    if not isinstance(recipe, Recipe):
        raise WorkbenchError(f"run() needs a workbench Recipe, got {type(recipe).__name__}")
    if _steps.is_language_model(recipe):
        if data is not None or model is not None:
            raise WorkbenchError("the GPT trains on its corpus (Recipe.dataset) from llm.TrainConfig settings; "
                                 "run() takes no data= or model= for it")
        return run_lm(recipe, cache=cache, use_cache=use_cache, progress=progress)
    ds = data if data is not None else _data.load(recipe.dataset, seed=recipe.seed)
    if model is None:
        net = models.build(recipe.model, input_shape=ds.input_shape, num_classes=ds.num_classes,
                           seed=recipe.seed, **recipe.options)
        model_id = f"zoo:{recipe.model}"
    else:
        if not isinstance(model, nn.Module):
            raise WorkbenchError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        net = copy.deepcopy(model)
        model_id = _cache.model_fingerprint(net)
    key = _cache.key(recipe, model_id, ds.fingerprint)
    root = cache_dir(cache) / "results"
    if use_cache and (hit := _cache.read(root / key, recipe)) is not None:
        return hit

    t0 = time.perf_counter()
    dense_accuracy = teacher_accuracy = None
    trained_before = 0.0
    history: dict[str, list[float]] = {}
    records: dict[str, Any] = {}
    if recipe.compressed:
        # Compression starts from the trained dense model, itself a cached run: a sweep over
        # pruning amounts trains the baseline once.
        base = run(recipe.dense(), data=ds, model=model, cache=cache, progress=progress)
        ctx = Context(recipe, ds, base.load_model(into=net if model is not None else None), progress)
        _apply_steps(ctx, "model", records)
        net = ctx.net
        dense_accuracy = base.accuracy
    elif use_cache and (twin := _cache.measured_twin(recipe, model_id, ds.fingerprint, root)) is not None:
        # The same training with other measurement settings is cached: its weights are these
        # (training does not depend on export_onnx/latency_repeats/threads), so only measure.
        net = twin.load_model(into=net if model is not None else None)
        history, trained_before, teacher_accuracy = dict(twin.history), twin.train_seconds, twin.teacher_accuracy
    else:
        train = dict(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, optimizer=recipe.optimizer,
                     weight_decay=recipe.weight_decay, seed=recipe.seed, progress=progress)
        sched = recipe.lr_schedule_for(schedules.steps_per_epoch(len(ds.X_train), recipe.batch_size))
        if sched is not None:
            train["lr_schedule"] = sched.factor
        if recipe.teacher is not None and recipe.epochs:
            teacher = run(recipe.teacher, data=ds, cache=cache, progress=progress)
            teacher_accuracy = teacher.accuracy
            hist = distill.distill(net, teacher.load_model(), ds, temperature=recipe.kd_temperature,
                                   alpha=recipe.kd_alpha, **train)
        else:
            hist = fit(net, ds, **train) if recipe.epochs else None
        history = hist.to_dict() if hist else {}
    train_seconds = time.perf_counter() - t0 + trained_before
    ctx = Context(recipe, ds, net, progress)
    return _cache.publish(root, key, recipe, lambda entry: _measure(
        ctx, entry, key, model is None, history, records, train_seconds, dense_accuracy, teacher_accuracy))


def sweep(recipes: Iterable[Recipe], *, progress: bool | None = None, **kwargs: Any) -> list[Result | LMResult]:
    """Run many recipes (each through the cache); results in the same order.

    Example:
        >>> results = sweep([Recipe(model=m) for m in ("mlp", "cnn")])
    """
    recipes = list(recipes)
    bar = tqdm(recipes, desc="sweep", disable=not show_progress(progress) or len(recipes) < 2, leave=False)
    return [run(r, progress=progress, **kwargs) for r in bar]

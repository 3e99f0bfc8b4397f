"""The pipeline's table of steps: every `Recipe` field belongs to exactly one step, declared here once.

A step names its Recipe fields, says when it is on (``active``), validates its settings, and, for
a compression step, applies itself to the trained model (``apply``) and returns a typed record
that the :class:`~workbench.recipe.Result` keeps under ``result.steps[step.name]``. Everything
else is derived from this table:

- ``COMPRESSION_FIELDS`` and ``Recipe.dense()``: the fields of the compression steps, reset;
- ``Recipe.compressed``: whether any compression step is active;
- the cache key: the fields of the active steps only, so a step that is off (and every step
  added later, off by default) leaves every key as it was;
- the order in which ``run`` applies the compression steps (the table's order).

Adding a technique is one entry here (plus its fields on `Recipe`); :func:`check_table` refuses,
at import, a Recipe field that belongs to no step or to two.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from .. import cluster, coding, fold, prune, quant, schedules
from .. import data as _data
from .. import llm, models
from .. import onnx as _onnx
from .. import ort as _ort
from ..errors import WorkbenchError
from ..train import OPTIMIZERS, Evaluation, fit

if TYPE_CHECKING:
    from .settings import Recipe

__all__ = ["Step", "Context", "STEPS", "COMPRESSION_FIELDS", "MEASUREMENT_FIELDS", "check_table", "step", "fields_of",
           "PruneRecord", "ShareRecord", "FoldRecord", "QuantRecord", "OrtQuantRecord", "PRUNE_KINDS",
           "PRUNE_SCOPES", "PRUNE_SCHEDULES", "PRUNE_METHODS", "QUANT_METHODS", "LANGUAGE_MODELS", "CORPORA",
           "is_language_model", "lm_train_config", "ORT_QUANT_MODES", "SENSITIVITY_GRID", "CALIBRATION_IMAGES",
           "MAX_EPOCHS"]

PRUNE_KINDS = ("unstructured", "structured", "2:4")
PRUNE_METHODS = llm.PRUNE_METHODS
QUANT_METHODS = ("rtn", "gptq", "awq", "smoothquant")
# The language models and the corpora they train on (Recipe.model / Recipe.dataset); every other
# model of the zoo is an image classifier on a dataset of workbench.data.
LANGUAGE_MODELS = ("gpt",)
CORPORA = llm.CORPORA
PRUNE_SCOPES = ("global", "layer", "sensitivity")
PRUNE_SCHEDULES = ("oneshot", "gradual")
ORT_QUANT_MODES = ("none",) + _ort.MODES
SENSITIVITY_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CALIBRATION_IMAGES = 512
# A bound on epochs that no run of this book comes near (the longest trains 100), so that a typo of
# many digits is an error, not a job that runs for years or overflows an int64 step counter.
MAX_EPOCHS = 1_000_000
MAX_PRUNE_STEPS = 1000
_INT_FIELDS = ("epochs", "batch_size", "seed", "threads", "latency_repeats", "prune_steps", "finetune_epochs",
               "weight_bits", "act_bits", "qat_epochs", "share_bits", "share_bits_conv", "share_epochs", "group_size")


@dataclass
class Context:
    """What a step's ``apply`` works on: the recipe, the data and the model (replaced in place).

    ``tune`` holds the fine-tuning settings the compression steps share (finetune_lr, else lr / 10).
    An ONNX step also gets the finished entry folder and the float model's test/validation counts,
    and replaces them by those of the model it writes.
    """

    recipe: "Recipe"
    data: _data.Dataset
    net: nn.Module
    progress: bool | None = None
    entry: Path | None = None
    test: Evaluation | None = None
    val: Evaluation | None = None

    @property
    def tune(self) -> dict[str, Any]:
        r = self.recipe
        return dict(lr=r.finetune_lr or r.lr / 10, batch_size=r.batch_size, optimizer=r.optimizer,
                    weight_decay=r.weight_decay, seed=r.seed, progress=self.progress)


class _Record:
    """Typed record of one step, kept in ``Result.steps``; JSON through ``to_dict``/``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        return cls(**d)


@dataclass(frozen=True)
class PruneRecord(_Record):
    """rounds: per pruning round, sparsity and validation accuracy (unstructured); amounts: the
    per-layer amounts of a sensitivity scan; finetune: the fine-tuning curves (structured)."""

    rounds: list[dict[str, float]] = field(default_factory=list)
    amounts: dict[str, float] = field(default_factory=dict)
    finetune: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShareRecord(_Record):
    """encoded_bytes: the Deep Compression encoding's size (``coding.Encoded.nbytes()``); layers:
    its per-layer breakdown; finetune: the centroid fine-tuning curves (empty without share_epochs)."""

    encoded_bytes: int
    layers: list[dict[str, Any]]
    finetune: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class FoldRecord(_Record):
    """folded: the BatchNorm layers folded into the preceding Conv/Linear."""

    folded: list[str]


@dataclass(frozen=True)
class QuantRecord(_Record):
    """qat: the quantization-aware fine-tuning curves (empty for PTQ)."""

    qat: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class OrtQuantRecord(_Record):
    """The ONNX Runtime int8 model: the mode used and why, per-channel or not, both file sizes, the
    float model's accuracy in torch (the Result's accuracy is the int8 model's), op counts, and the
    nodes kept in float."""

    mode: str
    reason: str
    per_channel: bool
    fp32_onnx_bytes: int
    int8_onnx_bytes: int
    torch_accuracy: float
    torch_val_accuracy: float
    ops: dict[str, int]
    kept_float: list[str]


@dataclass(frozen=True)
class Step:
    """One row of the table. ``kind`` is "train" (how the weights are trained), "measure" (what is
    measured, not trained) or "compress" (a compression step, applied in table order after training;
    ``phase`` "model" works on the torch model, "onnx" on the exported file)."""

    name: str
    kind: str
    fields: tuple[str, ...]
    active: Callable[["Recipe"], bool]
    validate: Callable[["Recipe"], None]
    apply: Callable[[Context], Any] | None = None
    record: type | None = None
    phase: str = "model"


def _number(r: "Recipe", name: str, *, low: float, high: float = math.inf, low_open: bool = False,
            hint: str = "") -> None:
    value = getattr(r, name)
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise WorkbenchError(f"Recipe.{name} must be a finite number {bound}{hint}, got {value!r}")


def _epochs(r: "Recipe", name: str, hint: str = "") -> None:
    if not 0 <= getattr(r, name) <= MAX_EPOCHS:
        raise WorkbenchError(f"Recipe.{name} must be in 0..{MAX_EPOCHS:,}{hint}, got {getattr(r, name)}")


def _one_of(r: "Recipe", name: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if getattr(r, name) not in allowed:
        raise WorkbenchError(f"Recipe.{name} must be one of {', '.join(allowed)}, got {getattr(r, name)!r}")


# ---- training -------------------------------------------------------------------------------------

def is_language_model(r: "Recipe") -> bool:
    return r.model in LANGUAGE_MODELS


def lm_train_config(r: "Recipe") -> llm.TrainConfig:
    """The GPT's training settings: ``model_options`` are :class:`workbench.llm.TrainConfig` fields, seeded by Recipe.seed."""
    known = [f.name for f in dataclasses.fields(llm.TrainConfig) if f.name != "seed"]
    unknown = sorted(set(r.options) - set(known))
    if unknown:
        raise WorkbenchError(f"unknown GPT option(s) {', '.join(unknown)} in model_options; known: {', '.join(known)}")
    return llm.TrainConfig(**r.options, seed=r.seed)


def _validate_train(r: "Recipe") -> None:
    for name in _INT_FIELDS:
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise WorkbenchError(f"Recipe.{name} must be an integer, got {value!r}")
    if is_language_model(r):
        _validate_lm(r)
        return
    if r.model.lower() not in models.MODELS:
        raise WorkbenchError(f"unknown model {r.model!r}; known models: {', '.join((*models.MODELS, *LANGUAGE_MODELS))}")
    if r.dataset.lower().replace("_", "-") not in _data.DATASETS:
        raise WorkbenchError(f"unknown dataset {r.dataset!r}; known datasets: {', '.join(_data.DATASETS)} for the "
                             f"image classifiers, {', '.join(CORPORA)} (text) for model='gpt'")
    _epochs(r, "epochs", " (0 measures the model untrained)")
    if r.batch_size < 1:
        raise WorkbenchError(f"Recipe.batch_size must be >= 1, got {r.batch_size}")
    if not 0 <= r.seed < 2**63:
        raise WorkbenchError(f"Recipe.seed must be in 0..2**63-1 (torch's seed range), got {r.seed}")
    _number(r, "lr", low=0, low_open=True, hint=" (e.g. 1e-3)")
    _number(r, "weight_decay", low=0, hint=" (0 turns it off; 1e-4..0.1 typical)")
    if r.optimizer not in OPTIMIZERS:
        raise WorkbenchError(f"unknown optimizer {r.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


# What a language-model recipe may set: the GPT trains by steps with AdamW and a warmup + cosine schedule
# set in model_options (llm.TrainConfig), and is compressed without retraining by the prune and quantize
# steps; every other setting must stay at its default, so that nothing a user sets is silently ignored.
_LM_FIXED = ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "teacher", "lr_schedule", "lr_schedule_options",
             "finetune_lr", "prune_scope", "prune_schedule", "prune_steps", "prune_exclude", "finetune_epochs",
             "quant_granularity", "calibration", "qat_epochs", "share_bits", "share_epochs", "fold_bn", "ort_quant")


def _validate_lm(r: "Recipe") -> None:
    if r.dataset not in CORPORA:
        raise WorkbenchError(f"model {r.model!r} is a language model: train it on a text corpus "
                             f"(dataset one of {', '.join(CORPORA)}), got dataset {r.dataset!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(r)}
    for name in _LM_FIXED:
        if getattr(r, name) != defaults[name]:
            raise WorkbenchError(f"Recipe.{name} does not apply to the GPT (it trains by steps with AdamW + warmup-"
                                 f"cosine set in model_options, e.g. {{'steps': 300, 'lr': 3e-3}}, and is compressed "
                                 f"without retraining): leave it at its default ({defaults[name]!r})")
    cfg = lm_train_config(r)
    widths = {"n_embd": cfg.n_embd, "mlp_ratio * n_embd": cfg.mlp_ratio * cfg.n_embd}
    if isinstance(r.group_size, int) and r.group_size > 0:
        bad = {k: v for k, v in widths.items() if v % r.group_size}
        if bad:
            raise WorkbenchError(f"Recipe.group_size {r.group_size} does not divide the GPT's layer input width(s) "
                                 + ", ".join(f"{k} = {v}" for k, v in bad.items())
                                 + f"; use a divisor of {math.gcd(*widths.values())} (e.g. 32, 64, 128)")
    if r.prune_kind == "structured":
        raise WorkbenchError("the GPT is pruned unstructured or 2:4 (prune_kind 'unstructured' or '2:4'), "
                             "not by channels")
    if r.quantized and r.act_bits and r.quant_method in ("gptq", "awq"):
        raise WorkbenchError(f"quant_method {r.quant_method!r} is weight-only: set act_bits=0, or use 'rtn' or "
                             "'smoothquant' for W8A8")
    if r.quant_method == "smoothquant" and not r.act_bits:
        raise WorkbenchError("quant_method 'smoothquant' quantizes activations too: set act_bits (e.g. 8)")


def _validate_distill(r: "Recipe") -> None:
    if r.teacher is None:
        return  # (Recipe.__post_init__ made a dict a Recipe and refused anything else)
    if r.teacher.dataset != r.dataset:
        raise WorkbenchError(f"the teacher is trained on {r.teacher.dataset!r} but the student on "
                             f"{r.dataset!r}; distillation needs the same data")
    _number(r, "kd_temperature", low=0, low_open=True, hint=" (1 = plain softmax, 2-20 typical)")
    _number(r, "kd_alpha", low=0, high=1, hint=" (the weight of the soft-target loss)")


def _validate_schedule(r: "Recipe") -> None:
    r.lr_schedule_for(1)  # validates the kind and its options


def _validate_measure(r: "Recipe") -> None:
    if r.threads < 1 or r.latency_repeats < 1:
        raise WorkbenchError(f"Recipe.threads and latency_repeats must be >= 1, got {r.threads} and "
                             f"{r.latency_repeats}")
    if not isinstance(r.export_onnx, bool):
        raise WorkbenchError(f"Recipe.export_onnx must be True or False, got {r.export_onnx!r}")


# ---- compression ----------------------------------------------------------------------------------

def _validate_tune(r: "Recipe") -> None:
    if r.finetune_lr is not None:
        _number(r, "finetune_lr", low=0, low_open=True, hint=" (or None for lr / 10)")


def _validate_prune(r: "Recipe") -> None:
    a = r.prune_amount
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < 1.0:
        raise WorkbenchError(f"Recipe.prune_amount must be a fraction in [0, 1) (0.8 = remove 80%), got {a!r}")
    for name, allowed in (("prune_kind", PRUNE_KINDS), ("prune_scope", PRUNE_SCOPES),
                          ("prune_schedule", PRUNE_SCHEDULES), ("prune_method", PRUNE_METHODS)):
        _one_of(r, name, allowed)
    if not is_language_model(r) and (r.prune_method != "magnitude" or r.prune_kind == "2:4"):
        raise WorkbenchError("Wanda, SparseGPT and 2:4 pruning (prune_method, prune_kind '2:4') are the GPT's "
                             "(model='gpt'); the image classifiers prune by magnitude, unstructured or structured")
    if r.prune_kind == "2:4" and r.prune_amount != 0.5:
        raise WorkbenchError(f"2:4 sparsity removes exactly half of the weights: set prune_amount=0.5, "
                             f"got {r.prune_amount!r}")
    if r.prune_kind == "structured" and r.prune_schedule == "gradual":
        raise WorkbenchError("the gradual schedule is for unstructured pruning; structured pruning is one-shot")
    if r.prune_scope == "sensitivity" and r.prune_schedule == "gradual":
        raise WorkbenchError("prune_scope='sensitivity' sets per-layer amounts once (one-shot); "
                             "use scope 'global' or 'layer' with the gradual schedule")
    if not 1 <= r.prune_steps <= MAX_PRUNE_STEPS:
        raise WorkbenchError(f"Recipe.prune_steps must be in 1..{MAX_PRUNE_STEPS} (pruning rounds), got {r.prune_steps}")
    _epochs(r, "finetune_epochs")


def _apply_prune(ctx: Context) -> PruneRecord:
    r, net, ds = ctx.recipe, ctx.net, ctx.data
    if r.prune_kind == "structured":
        ctx.net = prune.channel_prune(net, r.prune_amount, input_shape=ds.input_shape, exclude=r.prune_exclude)
        hist = fit(ctx.net, ds, epochs=r.finetune_epochs, **ctx.tune) if r.finetune_epochs else None
        return PruneRecord(finetune=hist.to_dict() if hist else {})
    if r.prune_scope == "sensitivity":
        # Per-layer amounts from a sensitivity scan on the validation split: each layer gets the
        # largest amount (up to prune_amount) that alone costs at most one point of accuracy.
        grid = tuple(a for a in SENSITIVITY_GRID if a <= r.prune_amount) + (r.prune_amount,)
        per_layer = prune.amounts_from_scan(prune.sensitivity_scan(net, ds, amounts=tuple(sorted(set(grid)))),
                                            max_drop=0.01)
        per_layer = {n: a for n, a in per_layer.items() if n not in r.prune_exclude}
        prune.apply_masks(net, prune.magnitude_masks(net, per_layer, scope="layer"))
        prune.fine_tune(net, ds, epochs=r.finetune_epochs, **ctx.tune)
        ctx.net = prune.finalize(net)
        return PruneRecord(amounts=per_layer)
    steps = r.prune_steps if r.prune_schedule == "gradual" else 1
    rows = prune.gradual_prune(net, ds, final=r.prune_amount, steps=steps, epochs_per_step=r.finetune_epochs,
                               scope=r.prune_scope, exclude=r.prune_exclude, **ctx.tune)
    ctx.net = prune.finalize(net)
    return PruneRecord(rounds=rows)


def _validate_share(r: "Recipe") -> None:
    if r.share_bits and not (1 <= r.share_bits <= 16 and 1 <= r.share_bits_conv <= 16):
        raise WorkbenchError("Recipe.share_bits and share_bits_conv must be in 1..16 (0 turns sharing off)")
    if r.share_bits_conv < 1 or r.share_epochs < 0 or r.share_bits < 0:
        raise WorkbenchError("Recipe.share_bits must be >= 0, share_bits_conv >= 1 and share_epochs >= 0")
    _epochs(r, "share_epochs")
    if r.share_epochs and not r.share_bits:
        raise WorkbenchError("Recipe.share_epochs fine-tunes shared weights: set share_bits too")


def _apply_share(ctx: Context) -> ShareRecord:
    r = ctx.recipe
    books = cluster.share_weights(ctx.net, bits=cluster.layer_bits(ctx.net, conv=r.share_bits_conv, fc=r.share_bits),
                                  seed=r.seed)
    tuned = None
    if r.share_epochs:
        tuned = cluster.finetune_centroids(ctx.net, books, ctx.data, epochs=r.share_epochs, lr=ctx.tune["lr"],
                                           batch_size=r.batch_size, seed=r.seed, progress=ctx.progress)
    encoded = coding.encode(ctx.net, books)
    return ShareRecord(encoded_bytes=encoded.nbytes(), layers=encoded.breakdown(),
                       finetune=tuned.to_dict() if tuned else {})


def _validate_fold(r: "Recipe") -> None:
    if not isinstance(r.fold_bn, bool):
        raise WorkbenchError(f"Recipe.fold_bn must be True or False, got {r.fold_bn!r}")


def _apply_fold(ctx: Context) -> FoldRecord:
    folded = fold.batchnorm_layers(ctx.net)
    if not folded:
        raise WorkbenchError(f"fold_bn: this {ctx.recipe.model} model has no BatchNorm layer to fold "
                             "(the zoo's cnn has them unless batchnorm=false)")
    ctx.net = fold.fold_bn(ctx.net, strict=True)
    return FoldRecord(folded=folded)


def _validate_quant(r: "Recipe") -> None:
    if r.weight_bits < 0 or r.act_bits < 0:
        raise WorkbenchError("Recipe.weight_bits and act_bits must be >= 0 (0 bits keeps floats)")
    _one_of(r, "quant_method", QUANT_METHODS)
    if r.group_size < 0:
        raise WorkbenchError(f"Recipe.group_size must be >= 0 (0: no groups), got {r.group_size}")
    if r.group_size and r.quant_granularity not in ("per-channel", "per-group"):
        raise WorkbenchError(f"Recipe.group_size sets per-group scales; it contradicts quant_granularity "
                             f"{r.quant_granularity!r}")
    if not is_language_model(r) and r.quant_method != "rtn":
        raise WorkbenchError(f"quant_method {r.quant_method!r} is for the GPT (model='gpt'); the image classifiers "
                             "quantize by rounding to nearest ('rtn'), then optionally QAT")
    if (r.group_size or r.quant_method != "rtn") and not r.quantized:
        raise WorkbenchError("Recipe.group_size and quant_method configure quantization: set weight_bits too")
    _epochs(r, "qat_epochs")
    if r.quantized:
        if r.share_bits:
            raise WorkbenchError("choose one way to store weights in fewer bits: weight sharing (share_bits) or "
                                 "affine quantization (weight_bits/act_bits), not both")
        r.quant_config()  # validates bits, granularity, calibration
    elif r.qat_epochs:
        raise WorkbenchError("Recipe.qat_epochs needs quantization: set weight_bits and/or act_bits")


def _apply_quant(ctx: Context) -> QuantRecord:
    r = ctx.recipe
    qnet = quant.quantize_model(ctx.net, r.quant_config(), ctx.data.X_train[:CALIBRATION_IMAGES])
    hist = fit(qnet, ctx.data, epochs=r.qat_epochs, **ctx.tune) if r.qat_epochs else None
    ctx.net = qnet.eval()
    return QuantRecord(qat=hist.to_dict() if hist else {})


def _validate_ort_quant(r: "Recipe") -> None:
    _one_of(r, "ort_quant", ORT_QUANT_MODES)
    if r.ort_quant == "none":
        return
    if not r.export_onnx:
        raise WorkbenchError("Recipe.ort_quant quantizes the exported ONNX model: set export_onnx=True")
    if r.quantized or r.share_bits:
        raise WorkbenchError("Recipe.ort_quant quantizes a float model with ONNX Runtime; it does not combine "
                             "with fake quantization (weight_bits/act_bits) or weight sharing (share_bits)")


def _apply_ort_quant(ctx: Context) -> OrtQuantRecord:
    """Replace entry/model.onnx by its ONNX Runtime int8 version; its accuracy becomes the result's."""
    r, ds, entry = ctx.recipe, ctx.data, ctx.entry
    assert entry is not None and ctx.test is not None and ctx.val is not None
    fp32 = entry / "model.fp32.onnx"
    os.replace(entry / "model.onnx", fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" times int8 against fp32; the Result records latency itself
        q = _ort.quantize(fp32, entry / "model.onnx", mode=r.ort_quant,
                          calibration=ds.X_train[:CALIBRATION_IMAGES], threads=r.threads)
    fp32.unlink()
    sess = _onnx.session(entry / "model.onnx", threads=r.threads)
    record = OrtQuantRecord(mode=q.mode, reason=q.reason, per_channel=q.per_channel, fp32_onnx_bytes=q.fp32_bytes,
                            int8_onnx_bytes=q.int8_bytes, torch_accuracy=ctx.test.accuracy,
                            torch_val_accuracy=ctx.val.accuracy, ops=dict(q.ops), kept_float=list(q.kept_float))
    ctx.test = Evaluation.from_logits(torch.from_numpy(_onnx.run_session(sess, ds.X_test)), ds.y_test)
    ctx.val = Evaluation.from_logits(torch.from_numpy(_onnx.run_session(sess, ds.X_val)), ds.y_val)
    return record


def _always(r: "Recipe") -> bool:
    return True


STEPS: tuple[Step, ...] = (
    Step("train", "train", ("model", "dataset", "model_options", "epochs", "lr", "batch_size", "optimizer",
                            "weight_decay", "seed"), _always, _validate_train),
    Step("distill", "train", ("teacher", "kd_temperature", "kd_alpha"),
         lambda r: r.teacher is not None, _validate_distill),
    Step("lr_schedule", "train", ("lr_schedule", "lr_schedule_options"),
         lambda r: r.lr_schedule != "constant" or bool(r.lr_schedule_options), _validate_schedule),
    Step("measure", "measure", ("export_onnx", "threads", "latency_repeats"), _always, _validate_measure),
    # The fine-tuning rate that every compression step below shares; it matters only when one is on.
    Step("finetune", "compress", ("finetune_lr",), lambda r: r.compressed, _validate_tune),
    Step("prune", "compress", ("prune_amount", "prune_kind", "prune_scope", "prune_schedule", "prune_steps",
                               "prune_exclude", "finetune_epochs", "prune_method"),
         lambda r: r.prune_amount > 0, _validate_prune, _apply_prune, PruneRecord),
    Step("share", "compress", ("share_bits", "share_bits_conv", "share_epochs"),
         lambda r: r.share_bits > 0, _validate_share, _apply_share, ShareRecord),
    Step("fold_bn", "compress", ("fold_bn",), lambda r: r.fold_bn is True, _validate_fold, _apply_fold, FoldRecord),
    Step("quantize", "compress", ("weight_bits", "act_bits", "quant_symmetric", "quant_granularity", "calibration",
                                  "qat_epochs", "group_size", "quant_method"),
         lambda r: r.quantized, _validate_quant, _apply_quant, QuantRecord),
    Step("ort_quant", "compress", ("ort_quant",), lambda r: r.ort_quant != "none", _validate_ort_quant,
         _apply_ort_quant, OrtQuantRecord, phase="onnx"),
)


def step(name: str) -> Step:
    """The step called `name` in the current table."""
    for s in STEPS:
        if s.name == name:
            return s
    raise WorkbenchError(f"unknown pipeline step {name!r}; steps: {', '.join(s.name for s in STEPS)}")


def fields_of(kind: str) -> tuple[str, ...]:
    """The Recipe fields of every step of `kind` ("train", "measure" or "compress"), in table order."""
    return tuple(f for s in STEPS if s.kind == kind for f in s.fields)


# Everything reads the table through this module (``steps.STEPS``), so a table extended at run time
# (as the tests do to show what adding a step takes) is seen everywhere; these two are its snapshot.
COMPRESSION_FIELDS = fields_of("compress")
MEASUREMENT_FIELDS = fields_of("measure")


def check_table(recipe_cls: type, steps: tuple[Step, ...] | None = None) -> None:
    """Refuse a table (default: the current one) in which a field of `recipe_cls` belongs to no step
    or to two, a step names a field `recipe_cls` lacks, or a compression step has no record type."""
    steps = STEPS if steps is None else steps
    if len({s.name for s in steps}) != len(steps):
        raise WorkbenchError("two steps of the pipeline table share a name")
    names = [f.name for f in dataclasses.fields(recipe_cls)]
    owners: dict[str, list[str]] = {}
    for s in steps:
        if s.kind not in ("train", "measure", "compress") or s.phase not in ("model", "onnx"):
            raise WorkbenchError(f"step {s.name!r}: kind must be train/measure/compress and phase model/onnx")
        if s.kind == "compress" and s.apply is not None and s.record is None:
            raise WorkbenchError(f"compression step {s.name!r} has an apply but no record type for Result.steps")
        for f in s.fields:
            owners.setdefault(f, []).append(s.name)
    orphans = [n for n in names if n not in owners]
    if orphans:
        raise WorkbenchError(f"Recipe field(s) {', '.join(orphans)} belong to no step of the pipeline table "
                             "(workbench/recipe/steps.py): add them to the step they configure")
    shared = {f: o for f, o in owners.items() if len(o) > 1}
    if shared:
        raise WorkbenchError(f"Recipe field(s) claimed by two steps: {shared}")
    unknown = [f for f in owners if f not in names]
    if unknown:
        raise WorkbenchError(f"the step table names field(s) {', '.join(unknown)} that Recipe does not have")

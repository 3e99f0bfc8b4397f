"""The one pipeline: a `Recipe` of plain settings goes through `run` and comes back as a measured `Result`.

Results are cached on disk under a key that hashes the recipe, the model and the data (and the
versions of the code that measured them), so a sweep that was computed once answers at once.
Later chapters add compression steps to `Recipe`; every face of the project (CLI, widgets,
benchmarks, book) goes through `run`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import onnxruntime
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as _data
from . import cluster, distill, fold, measure, models, prune, quant, schedules
from . import ort as _ort
from . import onnx as _onnx
from .errors import WorkbenchError
from .measure import LatencyStats
from .train import OPTIMIZERS, evaluate, fit, show_progress

__all__ = ["Recipe", "Result", "run", "sweep", "load_model", "cache_dir", "RESULT_VERSION"]

# Bump when Result's fields or the meaning of a measurement change: old cache entries then miss.
# 7: accuracy counted in integers (test_correct / test_n) instead of a float32 mean.
RESULT_VERSION = 7
PRUNE_KINDS = ("unstructured", "structured")
SENSITIVITY_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
COMPRESSION_FIELDS = ("prune_amount", "prune_kind", "prune_scope", "prune_schedule", "prune_steps",
                      "prune_exclude", "finetune_epochs", "finetune_lr", "weight_bits", "act_bits",
                      "quant_symmetric", "quant_granularity", "calibration", "qat_epochs", "share_bits",
                      "share_bits_conv", "share_epochs", "fold_bn", "ort_quant")
CALIBRATION_IMAGES = 512
# Settings that change what is measured, not what is trained: runs that differ only in these
# share their trained weights (see _measured_twin).
MEASUREMENT_FIELDS = ("export_onnx", "threads", "latency_repeats")
ORT_QUANT_MODES = ("none",) + _ort.MODES
# Settings added after results were first cached: left out of the cache key while at their
# default, so every result computed before they existed is still found.
_KEY_OMIT_AT_DEFAULT = {"lr_schedule": "constant", "lr_schedule_options": {}, "fold_bn": False, "ort_quant": "none"}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where results are cached: `path`, else $WORKBENCH_CACHE, else ~/.cache/workbench."""
    if path is not None:
        return Path(path)
    env = os.environ.get("WORKBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "workbench"


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise WorkbenchError(f"recipe settings must be plain values (numbers, strings, lists), got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """Every setting of one pipeline run; frozen, hashable, JSON-serializable.

    Example:
        >>> r = Recipe(model="cnn", dataset="digits", epochs=20, model_options={"batchnorm": False})
    """

    model: str = "mlp"
    dataset: str = "digits"
    model_options: Any = ()
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    export_onnx: bool = True
    threads: int = 1
    latency_repeats: int = 200
    # Pruning (chapter 3): applied to the trained dense model, then fine-tuned. prune_scope is
    # "global", "layer" or "sensitivity" (per-layer amounts, at most prune_amount, from a scan).
    prune_amount: float = 0.0
    prune_kind: str = "unstructured"
    prune_scope: str = "global"
    prune_schedule: str = "oneshot"
    prune_steps: int = 4
    prune_exclude: Any = ()
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    # Knowledge distillation (chapter 5): train this model (the student) on the soft targets of
    # `teacher`, a Recipe (or its dict) trained first on the same data; None trains on labels.
    teacher: Any = None
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    # Quantization (chapter 4): fake-quantized weights and layer inputs; 0 bits keeps floats.
    # Calibrated on 512 training images (PTQ); qat_epochs > 0 then fine-tunes with fake quantization.
    weight_bits: int = 0
    act_bits: int = 0
    quant_symmetric: bool = True
    quant_granularity: str = "per-channel"
    calibration: str = "minmax"
    qat_epochs: int = 0
    # Deep Compression (chapter 6): k-means weight sharing, 2**share_bits shared values per Linear
    # layer (2**share_bits_conv per Conv2d), share_epochs of centroid fine-tuning, Huffman coding.
    share_bits: int = 0
    share_bits_conv: int = 8
    share_epochs: int = 0
    # LR decay (chapter 7): a workbench.schedules kind (constant, step, exponential, cosine,
    # polynomial) over the training epochs; options: gamma, power, min_lr_ratio, warmup_start and,
    # in epochs, step_epochs and warmup_epochs.
    lr_schedule: str = "constant"
    lr_schedule_options: Any = ()
    # Deployment (chapter 8): fold BatchNorm into the preceding Conv/Linear layer; quantize the
    # exported ONNX model to int8 with ONNX Runtime ("none", "dynamic", "static" QDQ, "auto"). With
    # ort_quant the Result describes the int8 ONNX model: its accuracy, size, ORT latency and parity.
    fold_bn: bool = False
    ort_quant: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_options", _freeze(dict(self.model_options)))
        object.__setattr__(self, "lr_schedule_options", _freeze(dict(self.lr_schedule_options)))
        if isinstance(self.teacher, Mapping):
            object.__setattr__(self, "teacher", Recipe.from_dict(self.teacher))
        object.__setattr__(self, "prune_exclude", tuple(str(n) for n in self.prune_exclude))
        if self.model.lower() not in models.MODELS:
            raise WorkbenchError(f"unknown model {self.model!r}; known models: {', '.join(models.MODELS)}")
        if self.dataset.lower().replace("_", "-") not in _data.DATASETS:
            raise WorkbenchError(f"unknown dataset {self.dataset!r}; known datasets: {', '.join(_data.DATASETS)}")
        for name in ("epochs", "batch_size", "seed", "threads", "latency_repeats", "prune_steps", "finetune_epochs",
                     "weight_bits", "act_bits", "qat_epochs", "share_bits", "share_bits_conv", "share_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise WorkbenchError(f"Recipe.{name} must be an integer, got {value!r}")
        if self.epochs < 0:
            raise WorkbenchError(f"Recipe.epochs must be >= 0 (0 measures the model untrained), got {self.epochs}")
        if self.batch_size < 1 or self.threads < 1 or self.latency_repeats < 1 or self.seed < 0:
            raise WorkbenchError("Recipe.batch_size, threads and latency_repeats must be >= 1 and seed >= 0")
        if not self.lr > 0:
            raise WorkbenchError(f"Recipe.lr must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise WorkbenchError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        self._validate_pruning()
        self._validate_distillation()
        self._validate_deployment()
        if self.share_bits and self.quantized:
            raise WorkbenchError("choose one way to store weights in fewer bits: weight sharing (share_bits) or "
                                 "affine quantization (weight_bits/act_bits), not both")
        if self.share_bits and not (1 <= self.share_bits <= 16 and 1 <= self.share_bits_conv <= 16):
            raise WorkbenchError("Recipe.share_bits and share_bits_conv must be in 1..16 (0 turns sharing off)")
        if self.share_epochs and not self.share_bits:
            raise WorkbenchError("Recipe.share_epochs fine-tunes shared weights: set share_bits too")
        if self.quantized:
            self.quant_config()  # validates bits, granularity, calibration
        elif self.qat_epochs:
            raise WorkbenchError("Recipe.qat_epochs needs quantization: set weight_bits and/or act_bits")

    @property
    def quantized(self) -> bool:
        return bool(self.weight_bits or self.act_bits)

    def quant_config(self) -> quant.QuantConfig:
        """The quantization settings as a :class:`workbench.quant.QuantConfig`."""
        return quant.QuantConfig(weight_bits=self.weight_bits, act_bits=self.act_bits, symmetric=self.quant_symmetric,
                                 granularity=self.quant_granularity, calibration=self.calibration)

    def lr_schedule_for(self, steps_per_epoch: int) -> schedules.Schedule | None:
        """The training LR schedule for `steps_per_epoch` optimizer steps per epoch (None: constant LR)."""
        if self.lr_schedule == "constant" and not self.lr_schedule_options:
            return None
        return schedules.from_epochs(self.lr_schedule, epochs=max(self.epochs, 1), steps_per_epoch=steps_per_epoch,
                                     **dict(self.lr_schedule_options))

    def _validate_deployment(self) -> None:
        self.lr_schedule_for(1)  # validates the kind and its options
        if not isinstance(self.fold_bn, bool):
            raise WorkbenchError(f"Recipe.fold_bn must be True or False, got {self.fold_bn!r}")
        if self.ort_quant not in ORT_QUANT_MODES:
            raise WorkbenchError(f"Recipe.ort_quant must be one of {', '.join(ORT_QUANT_MODES)}, got {self.ort_quant!r}")
        if self.ort_quant != "none" and not self.export_onnx:
            raise WorkbenchError("Recipe.ort_quant quantizes the exported ONNX model: set export_onnx=True")
        if self.ort_quant != "none" and (self.quantized or self.share_bits):
            raise WorkbenchError("Recipe.ort_quant quantizes a float model with ONNX Runtime; it does not combine "
                                 "with fake quantization (weight_bits/act_bits) or weight sharing (share_bits)")

    def _validate_distillation(self) -> None:
        if self.teacher is None:
            return
        if not isinstance(self.teacher, Recipe):
            raise WorkbenchError(f"Recipe.teacher must be a Recipe (or its dict), got {type(self.teacher).__name__}")
        if self.teacher.dataset != self.dataset:
            raise WorkbenchError(f"the teacher is trained on {self.teacher.dataset!r} but the student on "
                                 f"{self.dataset!r}; distillation needs the same data")
        t = self.kd_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise WorkbenchError(f"Recipe.kd_temperature must be > 0 (1 = plain softmax, 2-20 typical), got {t!r}")
        a = self.kd_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise WorkbenchError(f"Recipe.kd_alpha (weight of the soft-target loss) must be in [0, 1], got {a!r}")

    def _validate_pruning(self) -> None:
        a = self.prune_amount
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < 1.0:
            raise WorkbenchError(f"Recipe.prune_amount must be a fraction in [0, 1) (0.8 = remove 80%), got {a!r}")
        for name, allowed in (("prune_kind", PRUNE_KINDS), ("prune_scope", ("global", "layer", "sensitivity")),
                              ("prune_schedule", ("oneshot", "gradual"))):
            if getattr(self, name) not in allowed:
                raise WorkbenchError(f"Recipe.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.prune_kind == "structured" and self.prune_schedule == "gradual":
            raise WorkbenchError("the gradual schedule is for unstructured pruning; structured pruning is one-shot")
        if self.prune_scope == "sensitivity" and self.prune_schedule == "gradual":
            raise WorkbenchError("prune_scope='sensitivity' sets per-layer amounts once (one-shot); "
                                 "use scope 'global' or 'layer' with the gradual schedule")
        if self.prune_steps < 1 or self.finetune_epochs < 0:
            raise WorkbenchError("Recipe.prune_steps must be >= 1 and finetune_epochs >= 0")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise WorkbenchError(f"Recipe.finetune_lr must be positive (or None for lr / 10), got {self.finetune_lr!r}")

    @property
    def compressed(self) -> bool:
        """Whether any compression step is on (else this is a plain training run)."""
        return self.prune_amount > 0 or self.quantized or self.share_bits > 0 or self.fold_bn or self.ort_quant != "none"

    def dense(self) -> "Recipe":
        """The same recipe with every compression step off: the baseline it is compared with."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in COMPRESSION_FIELDS}
        return self.replace(**defaults)

    @property
    def options(self) -> dict[str, Any]:
        """`model_options` as keyword arguments for :func:`workbench.models.build`."""
        return {k: v for k, v in self.model_options}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_options"] = self.options
        d["prune_exclude"] = list(self.prune_exclude)
        d["lr_schedule_options"] = dict(self.lr_schedule_options)
        d["teacher"] = self.teacher.to_dict() if self.teacher is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WorkbenchError(f"unknown recipe setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Result:
    """What `run` measured for one recipe. Sizes are bytes, latencies microseconds, accuracy in [0, 1].

    `accuracy` is exactly ``test_correct / test_n`` (images counted on the test split); compare
    counts, or :func:`workbench.bars.check`, rather than this float against a decimal literal.
    """

    recipe: Recipe
    key: str
    accuracy: float
    test_correct: int
    test_n: int
    val_accuracy: float
    test_loss: float
    params: int
    nonzero_params: int
    macs: int
    size_state_dict_bytes: int
    size_onnx_bytes: int | None
    onnx_max_abs_err: float | None
    onnx_top1_agreement: float | None
    latency_torch_b1: LatencyStats
    latency_ort_b1: LatencyStats | None
    sparsity: float
    layer_sparsity: dict[str, float]
    sparse_bytes: dict[str, int]
    dense_accuracy: float | None
    teacher_accuracy: float | None
    size_quantized_bytes: int | None
    layer_sqnr: dict[str, float]
    size_encoded_bytes: int | None
    history: dict[str, Any]
    train_seconds: float
    checkpoint_path: str
    onnx_path: str | None
    versions: dict[str, str]
    created: str
    cached: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cached"}
        d["recipe"] = self.recipe.to_dict()
        d["latency_torch_b1"] = self.latency_torch_b1.to_dict()
        d["latency_ort_b1"] = self.latency_ort_b1.to_dict() if self.latency_ort_b1 else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, cached: bool = False) -> "Result":
        d = dict(d)
        d["recipe"] = Recipe.from_dict(d["recipe"])
        d["latency_torch_b1"] = LatencyStats.from_dict(d["latency_torch_b1"])
        d["latency_ort_b1"] = LatencyStats.from_dict(d["latency_ort_b1"]) if d["latency_ort_b1"] else None
        return cls(**d, cached=cached)

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a flat dict (for tables)."""
        return {
            "model": self.recipe.model, "dataset": self.recipe.dataset, "accuracy": round(self.accuracy, 4),
            "params": self.params, "sparsity": round(self.sparsity, 4), "MACs": self.macs,
            "state_dict KB": round(self.size_state_dict_bytes / 1024, 1),
            "ONNX KB": round(self.size_onnx_bytes / 1024, 1) if self.size_onnx_bytes else None,
            "torch p50 us": round(self.latency_torch_b1.p50_us, 1),
            "ORT p50 us": round(self.latency_ort_b1.p50_us, 1) if self.latency_ort_b1 else None,
        }

    def load_model(self, into: nn.Module | None = None) -> nn.Module:
        """The trained model from the cached checkpoint (for a user model, pass an instance as `into`).

        A quantized recipe gives back the fake-quantized model (its calibrated ranges included).
        """
        if into is None:
            return load_model(self.checkpoint_path)
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if self.recipe.quantized:
            into = quant.quantize_model(into, self.recipe.quant_config())
        into.load_state_dict(state["state_dict"])
        return into.eval()


def load_model(path: str | os.PathLike) -> nn.Module:
    """Load any checkpoint the pipeline wrote (``workbench train`` / ``compress``), quantized ones included."""
    try:
        return models.load_checkpoint(path)[0]
    except WorkbenchError:
        # A quantized checkpoint is a valid torch file whose weights sit inside FakeQuantLayers;
        # anything else keeps the original, clear error.
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            payload = None
        recipe = payload.get("metadata", {}).get("recipe") if isinstance(payload, dict) else None
        if not isinstance(recipe, dict) or not (recipe.get("weight_bits") or recipe.get("act_bits")):
            raise
    spec = payload["spec"]
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.get("options", {}).items()}
    model = models.build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                         **options)
    qmodel = quant.quantize_model(model, Recipe.from_dict(recipe).quant_config())
    qmodel.load_state_dict(payload["state_dict"])
    return qmodel.eval()


def _versions() -> dict[str, str]:
    from . import __version__

    return {"workbench": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "result": str(RESULT_VERSION)}


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(repr(model).encode())
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    h.update(buf.getvalue())
    return h.hexdigest()


def _key_dict(d: dict[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in d.items() if not (k in _KEY_OMIT_AT_DEFAULT and v == _KEY_OMIT_AT_DEFAULT[k])}
    if d.get("teacher"):
        d["teacher"] = _key_dict(d["teacher"])
    return d


def _key(recipe: Recipe, model_id: str, data_id: str) -> str:
    blob = json.dumps({"recipe": _key_dict(recipe.to_dict()), "model": model_id, "data": data_id,
                       "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cached(entry: Path) -> Result | None:
    try:
        return Result.from_dict(json.loads((entry / "result.json").read_text()), cached=True)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring a damaged cache entry {entry} ({type(exc).__name__}); recomputing it", stacklevel=3)
        return None


def _compress(recipe: Recipe, net: nn.Module, ds: _data.Dataset, progress: bool | None) -> tuple[nn.Module, dict]:
    """Apply the recipe's compression steps to the trained dense `net`; return the model and history."""
    tune = dict(lr=recipe.finetune_lr or recipe.lr / 10, batch_size=recipe.batch_size, optimizer=recipe.optimizer,
                weight_decay=recipe.weight_decay, seed=recipe.seed, progress=progress)
    history: dict[str, Any] = {}
    if recipe.prune_amount > 0:
        net, history = _prune(recipe, net, ds, tune)
    if recipe.share_bits:
        books = cluster.share_weights(net, bits=cluster.layer_bits(net, conv=recipe.share_bits_conv,
                                                                   fc=recipe.share_bits), seed=recipe.seed)
        if recipe.share_epochs:
            tuned = cluster.finetune_centroids(net, books, ds, epochs=recipe.share_epochs, lr=tune["lr"],
                                               batch_size=recipe.batch_size, seed=recipe.seed, progress=progress)
            history["share_finetune"] = tuned.to_dict() if tuned else {}
        encoded = cluster.encode(net, books)
        history["deep_compression"] = {"bytes": encoded.nbytes(), "layers": encoded.breakdown()}
    if recipe.fold_bn:
        if not fold.batchnorm_layers(net):
            raise WorkbenchError(f"fold_bn: this {recipe.model} model has no BatchNorm layer to fold "
                                 "(the zoo's cnn has them unless batchnorm=false)")
        history["fold_bn"] = {"folded": fold.batchnorm_layers(net)}
        net = fold.fold_bn(net, strict=True)
    if recipe.quantized:
        qnet = quant.quantize_model(net, recipe.quant_config(), ds.X_train[:CALIBRATION_IMAGES])
        if recipe.qat_epochs:
            history["qat"] = fit(qnet, ds, epochs=recipe.qat_epochs, **tune).to_dict()
        net = qnet.eval()
    return net, history


def _prune(recipe: Recipe, net: nn.Module, ds: _data.Dataset, tune: dict) -> tuple[nn.Module, dict]:
    if recipe.prune_kind == "structured":
        net = prune.channel_prune(net, recipe.prune_amount, input_shape=ds.input_shape, exclude=recipe.prune_exclude)
        hist = fit(net, ds, epochs=recipe.finetune_epochs, **tune) if recipe.finetune_epochs else None
        return net, {"finetune": hist.to_dict() if hist else {}}
    if recipe.prune_scope == "sensitivity":
        # Per-layer amounts from a sensitivity scan on the validation split: each layer gets the
        # largest amount (up to prune_amount) that alone costs at most one point of accuracy.
        grid = tuple(a for a in SENSITIVITY_GRID if a <= recipe.prune_amount) + (recipe.prune_amount,)
        per_layer = prune.amounts_from_scan(prune.sensitivity_scan(net, ds, amounts=tuple(sorted(set(grid)))),
                                            max_drop=0.01)
        per_layer = {n: a for n, a in per_layer.items() if n not in recipe.prune_exclude}
        prune.apply_masks(net, prune.magnitude_masks(net, per_layer, scope="layer"))
        prune.fine_tune(net, ds, epochs=recipe.finetune_epochs, **tune)
        return prune.finalize(net), {"sensitivity_amounts": per_layer}
    steps = recipe.prune_steps if recipe.prune_schedule == "gradual" else 1
    rows = prune.gradual_prune(net, ds, final=recipe.prune_amount, steps=steps, epochs_per_step=recipe.finetune_epochs,
                               scope=recipe.prune_scope, exclude=recipe.prune_exclude, **tune)
    return prune.finalize(net), {"prune_rounds": rows}


def _float_model(qnet: nn.Module) -> nn.Module:
    """The float model inside a fake-quantized one (weights as trained, not snapped to the grid)."""
    plain = copy.deepcopy(qnet)
    for name, m in list(plain.named_modules()):
        if isinstance(m, quant.FakeQuantLayer):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, m.layer)
    return plain


def _measure(recipe: Recipe, net: nn.Module, ds: _data.Dataset, entry: Path, key: str, builtin: bool,
             history: dict, train_seconds: float, dense_accuracy: float | None,
             teacher_accuracy: float | None) -> Result:
    """Evaluate, measure and export the finished model into the (temporary) entry folder."""
    test = evaluate(net, ds.X_test, ds.y_test)
    val = evaluate(net, ds.X_val, ds.y_val)
    x1 = ds.X_test[:1]
    ckpt = entry / "model.pt"
    quantized = isinstance(net, nn.Module) and any(isinstance(m, quant.FakeQuantLayer) for m in net.modules())
    if builtin:
        # Structured pruning changed the widths; the checkpoint records them so it can be rebuilt.
        widths = models.width_options(_float_model(net)) if quantized else models.width_options(net)
        folded = {"batchnorm": False} if recipe.fold_bn and recipe.model == "cnn" else {}
        spec = {"name": recipe.model, "input_shape": ds.input_shape, "num_classes": ds.num_classes,
                "options": recipe.options | widths | folded}
        models.save_checkpoint(ckpt, net, spec=spec, metadata={"recipe": recipe.to_dict(), "accuracy": test.accuracy})
    else:
        torch.save({"state_dict": net.state_dict()}, ckpt)
    onnx_path = parity = ort_lat = None
    if recipe.export_onnx:
        onnx_path = _onnx.export(net, entry / "model.onnx", input_shape=ds.input_shape)
        if recipe.ort_quant != "none":
            test, val = _ort_quantize(recipe, net, ds, entry, history, test, val)
        parity = _onnx.parity(net, onnx_path, ds.X_test)
        ort_lat = _onnx.ort_latency(onnx_path, x1, threads=recipe.threads, repeats=recipe.latency_repeats)
    plain = _float_model(net) if quantized else net
    sizes = (measure.model_sparse_sizes(plain)["total"]
             if any(isinstance(m, prune.PRUNABLE) for m in plain.modules()) else None)
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
        size_encoded_bytes=history.get("deep_compression", {}).get("bytes") if isinstance(history, dict) else None,
        sparse_bytes={"dense": sizes.dense, "csr": sizes.csr, "bitmask": sizes.bitmask,
                      "relative": sizes.relative} if sizes else {},
        dense_accuracy=dense_accuracy, teacher_accuracy=teacher_accuracy, history=history,
        train_seconds=train_seconds,
        checkpoint_path="model.pt", onnx_path="model.onnx" if onnx_path else None,
        versions=_versions(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _ort_quantize(recipe: Recipe, net: nn.Module, ds: _data.Dataset, entry: Path, history: dict, test: Any,
                  val: Any) -> tuple[Any, Any]:
    """Replace entry/model.onnx by its ONNX Runtime int8 version; its accuracy becomes the result's."""
    from .train import Evaluation

    fp32 = entry / "model.fp32.onnx"
    os.replace(entry / "model.onnx", fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" times int8 against fp32; the Result records latency itself
        q = _ort.quantize(fp32, entry / "model.onnx", mode=recipe.ort_quant,
                          calibration=ds.X_train[:CALIBRATION_IMAGES], threads=recipe.threads)
    sess = _onnx.session(entry / "model.onnx", threads=recipe.threads)

    def ort_eval(X: torch.Tensor, y: torch.Tensor) -> Evaluation:
        return Evaluation.from_logits(torch.from_numpy(_onnx.run_session(sess, X)), y)

    history["ort_quant"] = {"mode": q.mode, "reason": q.reason, "per_channel": q.per_channel,
                            "fp32_onnx_bytes": q.fp32_bytes, "int8_onnx_bytes": q.int8_bytes,
                            "torch_accuracy": test.accuracy, "torch_val_accuracy": val.accuracy, "ops": q.ops,
                            "kept_float": list(q.kept_float)}
    fp32.unlink()
    return ort_eval(ds.X_test, ds.y_test), ort_eval(ds.X_val, ds.y_val)


def _localize(result: Result, entry: Path) -> Result:
    """Paths are stored relative to the entry (the cache may move); hand them out absolute."""
    return dataclasses.replace(
        result, checkpoint_path=str(entry / "model.pt"),
        onnx_path=str(entry / "model.onnx") if result.onnx_path else None,
    )


def run(recipe: Recipe, *, data: _data.Dataset | None = None, model: nn.Module | None = None,
        cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool | None = None) -> Result:
    """Run one recipe end to end: build (or take) the model, train, evaluate, measure, export.

    Args:
        recipe: the settings.
        data: a loaded dataset; default ``workbench.data.load(recipe.dataset, seed=recipe.seed)``.
        model: your own ``nn.Module`` instead of the zoo's ``recipe.model`` (it is copied, not
            modified; its architecture and weights enter the cache key).
        cache: the cache folder (see :func:`cache_dir`).
        use_cache: False recomputes (and refreshes the cache entry).
        progress: show training progress bars (None: on unless CI / WORKBENCH_PROGRESS=0).

    Returns:
        The :class:`Result`; ``result.cached`` says whether it came from the cache.

    Example:
        >>> res = run(Recipe(model="mlp", epochs=30)); print(res.accuracy, res.size_onnx_bytes)
    """
    if not isinstance(recipe, Recipe):
        raise WorkbenchError(f"run() needs a workbench Recipe, got {type(recipe).__name__}")
    ds = data if data is not None else _data.load(recipe.dataset, seed=recipe.seed)
    if model is None:
        net = models.build(recipe.model, input_shape=ds.input_shape, num_classes=ds.num_classes,
                           seed=recipe.seed, **recipe.options)
        model_id = f"zoo:{recipe.model}"
    else:
        if not isinstance(model, nn.Module):
            raise WorkbenchError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        net = copy.deepcopy(model)
        model_id = _model_fingerprint(net)
    key = _key(recipe, model_id, ds.fingerprint)
    root = cache_dir(cache) / "results"
    entry = root / key
    if use_cache and (hit := _read_cached(entry)) is not None:
        return _localize(hit, entry)

    t0 = time.perf_counter()
    dense_accuracy = teacher_accuracy = None
    trained_before = 0.0
    if recipe.compressed:
        # Compression starts from the trained dense model, itself a cached run: a sweep over
        # pruning amounts trains the baseline once.
        base = run(recipe.dense(), data=ds, model=model, cache=cache, progress=progress)
        net = base.load_model(into=net if model is not None else None)
        net, history = _compress(recipe, net, ds, progress)
        dense_accuracy = base.accuracy
    elif use_cache and (twin := _measured_twin(recipe, model_id, ds.fingerprint, root)) is not None:
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

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = _measure(recipe, net, ds, tmp, key, model is None, history, train_seconds, dense_accuracy,
                          teacher_accuracy)
        (tmp / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        # Publish the finished entry with one rename, so readers never see half an entry. An
        # older or damaged entry is moved aside first; if another process published the same
        # key meanwhile, its entry is equally valid and ours is dropped.
        if entry.exists():
            stale = root / f".stale-{key}-{os.getpid()}"
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if _read_cached(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _localize(result, entry)


def _measured_twin(recipe: Recipe, model_id: str, data_id: str, root: Path) -> Result | None:
    """The cached run that trained exactly like `recipe` with the default measurement settings, if any."""
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.name in MEASUREMENT_FIELDS}
    twin = recipe.replace(**defaults)
    if twin == recipe:
        return None
    entry = root / _key(twin, model_id, data_id)
    hit = _read_cached(entry)
    return _localize(hit, entry) if hit is not None else None


def sweep(recipes: Iterable[Recipe], *, progress: bool | None = None, **kwargs: Any) -> list[Result]:
    """Run many recipes (each through the cache); results in the same order.

    Example:
        >>> results = sweep([Recipe(model=m) for m in ("mlp", "cnn")])
    """
    recipes = list(recipes)
    bar = tqdm(recipes, desc="sweep", disable=not show_progress(progress) or len(recipes) < 2, leave=False)
    return [run(r, progress=progress, **kwargs) for r in bar]

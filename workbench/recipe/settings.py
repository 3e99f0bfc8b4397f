"""`Recipe`: every setting of one pipeline run, a frozen dataclass of plain values.

Which step each field configures, how it is validated and what it does is declared in
:mod:`workbench.recipe.steps`; this class only holds the values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .. import quant, schedules
from ..errors import WorkbenchError
from . import steps as _steps

__all__ = ["Recipe"]


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
    # Language models (model="gpt") prune without retraining: "magnitude" (per layer), "wanda" (|W| x input
    # norm, per output row) or "sparsegpt" (OBS row reconstruction); prune_kind "2:4" keeps 2 of every 4.
    prune_method: str = "magnitude"
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
    # Per-group scales: a scale per group_size consecutive inputs of each output channel (setting it
    # implies quant_granularity "per-group"; 0 = 16 for a per-group classifier, per channel for the GPT).
    # quant_method: "rtn" (round to nearest); for the GPT also "gptq", "awq" (weight-only) and
    # "smoothquant" (with act_bits: W8A8 per tensor after SmoothQuant's scales).
    group_size: int = 0
    quant_method: str = "rtn"
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
        for name in ("model_options", "lr_schedule_options"):
            value = getattr(self, name)
            if not isinstance(value, (Mapping, list, tuple)):
                raise WorkbenchError(f"Recipe.{name} must be a mapping of option names to values, got {value!r}")
            try:
                pairs = dict(value)
            except (TypeError, ValueError) as exc:
                raise WorkbenchError(f"Recipe.{name} must be a mapping of option names to values, "
                                     f"got {value!r}") from exc
            object.__setattr__(self, name, _freeze(pairs))
        if isinstance(self.teacher, Mapping):
            object.__setattr__(self, "teacher", Recipe.from_dict(self.teacher))
        elif self.teacher is not None and not isinstance(self.teacher, Recipe):
            raise WorkbenchError(f"Recipe.teacher must be a Recipe (or its dict), got {type(self.teacher).__name__}")
        if isinstance(self.prune_exclude, str) or not isinstance(self.prune_exclude, (list, tuple)):
            raise WorkbenchError(f"Recipe.prune_exclude must be a list of layer names, got {self.prune_exclude!r}")
        object.__setattr__(self, "prune_exclude", tuple(str(n) for n in self.prune_exclude))
        for name in ("model", "dataset", "optimizer", "lr_schedule"):
            if not isinstance(getattr(self, name), str):
                raise WorkbenchError(f"Recipe.{name} must be a string, got {getattr(self, name)!r}")
        for step in _steps.STEPS:  # the table's order: training settings first, then each compression step
            step.validate(self)

    @property
    def quantized(self) -> bool:
        return bool(self.weight_bits or self.act_bits)

    def quant_config(self) -> quant.QuantConfig:
        """The quantization settings as a :class:`workbench.quant.QuantConfig`."""
        per_group = self.group_size > 0 or self.quant_granularity == "per-group"
        return quant.QuantConfig(weight_bits=self.weight_bits, act_bits=self.act_bits, symmetric=self.quant_symmetric,
                                 granularity="per-group" if per_group else self.quant_granularity,
                                 group_size=self.group_size or quant.QuantConfig.group_size,
                                 calibration=self.calibration)

    def lr_schedule_for(self, steps_per_epoch: int) -> schedules.Schedule | None:
        """The training LR schedule for `steps_per_epoch` optimizer steps per epoch (None: constant LR)."""
        if self.lr_schedule == "constant" and not self.lr_schedule_options:
            return None
        return schedules.from_epochs(self.lr_schedule, epochs=max(self.epochs, 1), steps_per_epoch=steps_per_epoch,
                                     **dict(self.lr_schedule_options))

    @property
    def compressed(self) -> bool:
        """Whether any compression step of the table is on (else this is a plain training run)."""
        return any(s.active(self) for s in _steps.STEPS if s.kind == "compress" and s.apply is not None)

    def active_steps(self) -> tuple[str, ...]:
        """The names of the steps this recipe turns on, in the table's order."""
        return tuple(s.name for s in _steps.STEPS if s.active(self))

    def dense(self) -> "Recipe":
        """The same recipe with every compression step off: the baseline it is compared with."""
        return self._reset(_steps.fields_of("compress"))

    def without(self, step: str) -> "Recipe":
        """The same recipe with one step's settings back at their defaults (that step off)."""
        return self._reset(_steps.step(step).fields)

    def _reset(self, names: tuple[str, ...]) -> "Recipe":
        return self.replace(**{f.name: f.default for f in dataclasses.fields(self) if f.name in names})

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
        if not isinstance(d, Mapping):
            raise WorkbenchError(f"a recipe must be a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WorkbenchError(f"unknown recipe setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


_steps.check_table(Recipe)

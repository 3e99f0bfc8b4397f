"""`Result`: what `run` measured for one recipe, with a typed record per compression step that ran."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import onnxruntime
import torch
from torch import nn

from .. import models, quant
from ..errors import WorkbenchError
from ..measure import LatencyStats
from .settings import Recipe
from . import steps as _steps

__all__ = ["Result", "load_model", "RESULT_VERSION"]

# Bump when Result's fields or the meaning of a measurement change: old cache entries then miss.
# 7: accuracy counted in integers (test_correct / test_n) instead of a float32 mean.
# 8: each compression step's outcome is a typed record in Result.steps; history is training only.
RESULT_VERSION = 8


@dataclass(frozen=True)
class Result:
    """What `run` measured for one recipe. Sizes are bytes, latencies microseconds, accuracy in [0, 1].

    `accuracy` is exactly ``test_correct / test_n`` (images counted on the test split); compare
    counts, or :func:`workbench.bars.check`, rather than this float against a decimal literal.
    `history` holds the training curves of this run (empty for a compressed recipe: its weights
    come from the dense run); `steps` maps each compression step that ran to its typed record
    (:mod:`workbench.recipe.steps`), e.g. ``result.steps["fold_bn"].folded``.
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
    history: dict[str, list[float]]
    steps: dict[str, Any]
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
        d["steps"] = {name: record.to_dict() for name, record in self.steps.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, cached: bool = False) -> "Result":
        d = dict(d)
        d["recipe"] = d["recipe"] if isinstance(d["recipe"], Recipe) else Recipe.from_dict(d["recipe"])
        d["latency_torch_b1"] = LatencyStats.from_dict(d["latency_torch_b1"])
        d["latency_ort_b1"] = LatencyStats.from_dict(d["latency_ort_b1"]) if d["latency_ort_b1"] else None
        d["steps"] = {name: _steps.step(name).record.from_dict(r) for name, r in d["steps"].items()}
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
    payload = models.read_checkpoint(path)  # a clear error for a missing, foreign or incomplete file
    recipe = payload["metadata"].get("recipe")
    if not (isinstance(recipe, dict) and (recipe.get("weight_bits") or recipe.get("act_bits"))):
        return models.load_checkpoint(path)[0]
    # A quantized checkpoint's weights sit inside FakeQuantLayers: build the model, wrap it the way
    # its recipe says, then load.
    spec = payload["spec"]
    model = models.build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                         **spec["options"])
    qmodel = quant.quantize_model(model, Recipe.from_dict(recipe).quant_config())
    try:
        qmodel.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise WorkbenchError(f"{str(path)!r}: the quantized weights do not fit model {spec['name']!r}: "
                             f"{reason}") from exc
    return qmodel.eval()


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"workbench": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "result": str(RESULT_VERSION)}

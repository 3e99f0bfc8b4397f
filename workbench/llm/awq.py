"""AWQ (Lin et al. 2024), activation-aware weight quantization: scale up the weight columns that meet
large inputs before rounding, so their relative rounding error shrinks, and divide the input by the
same scale in the layer that produces it (the fp model is unchanged; only the quantization moves).

Per Linear, ``s = mean|x|^alpha`` per input channel (normalized to ``sqrt(max s * min s) = 1``), with
alpha searched on a grid in [0, 1] for the lowest output error ``||W X - (Q(W diag s) / s) X||^2`` on
calibration rows; alpha = 0 is plain RTN, so on those rows AWQ is never worse than RTN. The scale is
folded by :func:`workbench.llm.calib.fold_scale` (LayerNorm before qkv and fc, value rows of qkv
before attn.proj); ``mlp.proj`` follows GELU and is quantized without a scale. (AWQ's clipping search
is left out.)
"""

from __future__ import annotations

import copy

import torch

from ..errors import WorkbenchError
from .calib import block_linears, can_fold, check_calibration, collect_inputs, fold_scale
from .gpt import GPT
from .weights import WeightQuant, layer_error, rtn

__all__ = ["awq_search", "awq"]


def awq_search(weight: torch.Tensor, X: torch.Tensor, absmean: torch.Tensor, spec: WeightQuant, *,
               grid: int = 21) -> tuple[torch.Tensor, float, float]:
    """The best (scale s, alpha, output error) for one Linear on calibration rows X (n, cols)."""
    if grid < 2:
        raise WorkbenchError(f"the alpha grid needs at least 2 points, got {grid}")
    spec.check(weight)
    w = weight.detach().float()
    base = absmean.float().clamp(min=1e-6)
    best = (torch.ones_like(base), 0.0, float("inf"))
    for alpha in torch.linspace(0, 1, grid).tolist():
        s = base ** alpha
        s = s / (s.max() * s.min()).sqrt()
        w_hat = rtn(w * s[None, :], spec)[0] / s[None, :]
        err = layer_error(w, w_hat, X)
        if err < best[2]:
            best = (s, alpha, err)
    return best


def awq(model: GPT, calib: torch.Tensor, spec: WeightQuant, *, grid: int = 21,
        keep_rows: int = 2048) -> tuple[GPT, dict[str, float]]:
    """A copy of `model` with AWQ's scales folded in (same fp function) and the alpha chosen per layer.

    Quantize the result with ``quantize_weights(scaled, spec)`` (RTN) or ``method="gptq"``.

    Example:
        >>> scaled, alphas = awq(model, calibration_ids(corpus), WeightQuant(4, 32))
        >>> qmodel, packed = quantize_weights(scaled, WeightQuant(4, 32))
    """
    check_calibration(calib)
    layers = block_linears(model)
    for name, layer in layers.items():
        spec.check(layer.weight, name)
    scaled = copy.deepcopy(model).eval()
    stats = collect_inputs(scaled, calib, keep_rows=keep_rows)  # from the fp model, once
    new_layers = block_linears(scaled)
    alphas: dict[str, float] = {}
    for i in range(len(scaled.blocks)):
        # attn.proj first: its scale divides the value rows of qkv, whose own search then sees them.
        for sub in ("attn.proj", "attn.qkv", "mlp.fc"):
            name = f"blocks.{i}.{sub}"
            if name not in new_layers or not can_fold(name):
                continue
            s, alpha, _ = awq_search(new_layers[name].weight, stats[name].rows, stats[name].absmean, spec, grid=grid)
            fold_scale(scaled, name, s)
            alphas[name] = alpha
    return scaled, alphas

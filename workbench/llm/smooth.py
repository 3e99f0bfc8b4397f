"""Activations of the GPT's Linear inputs: per-channel statistics (are there outlier channels?),
W8A8 per-tensor fake quantization, and SmoothQuant (Xiao et al. 2023), which moves the activations'
outliers into the weights before quantizing both.

SmoothQuant divides input channel j by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies
weight column j by it (folded as in :func:`workbench.llm.calib.fold_scale`, so the fp model is
unchanged); alpha is searched per layer on a grid for the lowest W8A8 output error on calibration rows.
W8A8 here: weights symmetric per tensor, activations asymmetric per tensor with a min-max range fixed by
calibration (``workbench.quant.FakeQuantLayer``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import WorkbenchError
from ..quant import FakeQuantLayer, QuantConfig, compute_qparams, fake_quantize, qparams_from_range
from .calib import block_linears, can_fold, check_calibration, collect_inputs, fold_scale
from .gpt import GPT

__all__ = ["ChannelStats", "activation_stats", "w8a8", "smoothquant_scale", "smoothquant", "w8a8_layer_error"]


@dataclass(frozen=True)
class ChannelStats:
    """Per input channel: max |x| and median |x| over the calibration rows."""

    absmax: torch.Tensor
    median: torch.Tensor

    @property
    def outlier_ratio(self) -> float:
        """Largest channel max over the median channel max: ~1-3 means no outlier channels, >> 10 means some."""
        return float(self.absmax.max() / self.absmax.median().clamp(min=1e-12))

    def outliers(self, factor: float = 6.0) -> list[int]:
        """Channels whose max |x| exceeds `factor` times the median channel's max."""
        return torch.nonzero(self.absmax > factor * self.absmax.median()).flatten().tolist()


def activation_stats(model: GPT, calib: torch.Tensor) -> dict[str, ChannelStats]:
    """:class:`ChannelStats` at the input of every block Linear.

    Example:
        >>> {n: round(s.outlier_ratio, 1) for n, s in activation_stats(model, calib).items()}
    """
    stats = collect_inputs(model, calib, keep_rows=calib.numel())
    return {n: ChannelStats(absmax=s.absmax, median=s.rows.abs().median(0).values) for n, s in stats.items()}


def w8a8_layer_error(weight: torch.Tensor, X: torch.Tensor, s: torch.Tensor, bits: int = 8) -> float:
    """``||W X - fq(W diag s) fq(X / s)||^2`` with per-tensor W (symmetric) and X (asymmetric) fake quantization."""
    ws = weight.detach().float() * s[None, :]
    xs = X.float() / s[None, :]
    wq = fake_quantize(ws, compute_qparams(ws, bits=bits, symmetric=True))
    xq = fake_quantize(xs, qparams_from_range(xs.min(), xs.max(), bits=bits, symmetric=False))
    return float(((X.double() @ weight.detach().double().T - xq.double() @ wq.double().T) ** 2).sum())


def smoothquant_scale(weight: torch.Tensor, x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (channels that never fire keep s = 1)."""
    w_max = weight.detach().abs().amax(0).clamp(min=1e-5)
    x_max = x_absmax.float().clamp(min=1e-5)
    s = x_max ** alpha / w_max ** (1 - alpha)
    return torch.where(x_absmax > 0, s, torch.ones_like(s))


def smoothquant(model: GPT, calib: torch.Tensor, *, alphas: tuple[float, ...] | None = None,
                bits: int = 8) -> tuple[GPT, dict[str, float]]:
    """A copy of `model` with SmoothQuant's scales folded in (same fp function) and the alpha per layer.

    Example:
        >>> smoothed, alphas = smoothquant(model, calib); q = w8a8(smoothed, calib)
    """
    check_calibration(calib)
    alphas = alphas if alphas is not None else tuple(a / 10 for a in range(11))
    smoothed = copy.deepcopy(model).eval()
    stats = collect_inputs(smoothed, calib, keep_rows=2048)
    layers = block_linears(smoothed)
    chosen: dict[str, float] = {}
    for i in range(len(smoothed.blocks)):
        for sub in ("attn.proj", "attn.qkv", "mlp.fc"):  # proj first: it rescales qkv's value rows
            name = f"blocks.{i}.{sub}"
            if not can_fold(name):
                continue
            w, st = layers[name].weight, stats[name]
            errs = {a: w8a8_layer_error(w, st.rows, smoothquant_scale(w, st.absmax, a), bits) for a in alphas}
            a = min(errs, key=errs.get)
            fold_scale(smoothed, name, smoothquant_scale(w, st.absmax, a))
            chosen[name] = a
    return smoothed, chosen


def w8a8(model: GPT, calib: torch.Tensor, *, weight_bits: int = 8, act_bits: int = 8) -> GPT:
    """A copy of `model` whose block Linears fake-quantize weights (per tensor, symmetric) and inputs
    (per tensor, min-max range calibrated on `calib`)."""
    check_calibration(calib)
    if not act_bits:
        raise WorkbenchError("W8A8 needs activation bits; use quantize_weights for weight-only quantization")
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, symmetric=True, granularity="per-tensor")
    q = copy.deepcopy(model).eval()
    stats = collect_inputs(q, calib, keep_rows=calib.numel())
    for name, layer in block_linears(q).items():
        rows = stats[name].rows
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent), child,
                FakeQuantLayer(layer, config, (float(rows.min()), float(rows.max()))).eval())
    return q

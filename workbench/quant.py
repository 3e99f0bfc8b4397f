"""Quantization: affine math at 1..16 bits (symmetric/asymmetric; per-tensor, per-channel, per-group),
fake quantization with a straight-through estimator, calibration, SQNR, PTQ/QAT model rewriting, and
an integer-only reference for Linear/Conv2d.

The math follows ``q = clamp(round(x / S) + Z, qmin, qmax)`` and ``x_hat = S (q - Z)``; like
PyTorch's kernels, ``x / S`` is computed as ``x * (1 / S)`` so results agree bit for bit with
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .errors import WorkbenchError

__all__ = [
    "QParams", "qrange", "qparams_from_range", "compute_qparams", "quantize", "dequantize", "fake_quantize",
    "CALIBRATIONS", "calibrate_range", "sqnr", "QuantConfig", "FakeQuantLayer", "quantize_model",
    "collect_inputs", "feed_inputs", "layer_sqnr", "packed_bytes", "int_forward", "int_float_gap_bound",
]

CALIBRATIONS = ("minmax", "moving_average", "percentile", "mse")
GRANULARITIES = ("per-tensor", "per-channel", "per-group")
_EPS = torch.finfo(torch.float32).eps


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise WorkbenchError(f"bits must be an integer in 1..16, got {bits!r}")
    return bits


def qrange(bits: int, *, symmetric: bool) -> tuple[int, int]:
    """The integer range: signed [-2^(b-1), 2^(b-1)-1] when symmetric, unsigned [0, 2^b-1] otherwise."""
    _check_bits(bits)
    if symmetric:
        if bits == 1:
            raise WorkbenchError("1-bit symmetric quantization has only the levels -1 and 0 (qmax = 0, no scale); "
                                 "use asymmetric 1-bit (two levels, one of them 0) or at least 2 bits")
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (one per tensor, per channel along `axis`, or per group) and the range."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None
    group_size: int | None = None

    @property
    def bits(self) -> int:
        return int(math.log2(self.qmax - self.qmin + 1))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, *, bits: int, symmetric: bool, axis: int | None = None,
                       group_size: int | None = None) -> QParams:
    """Scale and zero point that map [lo, hi] (widened to include 0) onto the integer range.

    Asymmetric: ``S = (hi - lo) / (qmax - qmin)``, ``Z = qmin - round(lo / S)``. Symmetric:
    ``Z = 0``, ``S = max(|lo|, |hi|) / qmax``. A range of width 0 (a constant or empty-range
    tensor) gets the smallest positive scale instead of dividing by zero.
    """
    qmin, qmax = qrange(bits, symmetric=symmetric)
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        scale = torch.clamp(scale, min=_EPS)
        zero = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=_EPS)
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return QParams(scale=scale, zero_point=zero, qmin=qmin, qmax=qmax, axis=axis, group_size=group_size)


def _grouped(x: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """View x as (channels, groups, group_size), channels along `axis`."""
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if moved.shape[1] % group_size:
        raise WorkbenchError(f"group_size {group_size} must divide the {moved.shape[1]} values per channel")
    return moved.reshape(moved.shape[0], -1, group_size)


def compute_qparams(x: torch.Tensor, *, bits: int, symmetric: bool = True, axis: int | None = None,
                    group_size: int | None = None) -> QParams:
    """Min-max qparams of `x`: per tensor (axis None), per channel along `axis`, or per group of
    `group_size` consecutive values within each channel.

    Example:
        >>> qp = compute_qparams(layer.weight, bits=8, axis=0)   # per output channel
    """
    x = x.detach()
    if x.numel() == 0:
        raise WorkbenchError("cannot compute quantization parameters of an empty tensor")
    if axis is not None and not -x.dim() <= axis < x.dim():
        raise WorkbenchError(f"axis {axis} does not exist in a tensor of shape {tuple(x.shape)} ({x.dim()} dims)")
    if group_size is not None:
        if axis is None:
            raise WorkbenchError("per-group quantization needs the channel axis (groups are within a channel)")
        g = _grouped(x, axis, group_size)
        return qparams_from_range(g.amin(-1), g.amax(-1), bits=bits, symmetric=symmetric, axis=axis % x.dim(),
                                  group_size=group_size)
    if axis is None:
        return qparams_from_range(x.min(), x.max(), bits=bits, symmetric=symmetric)
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return qparams_from_range(flat.amin(1), flat.amax(1), bits=bits, symmetric=symmetric, axis=axis % x.dim())


def _broadcast(t: torch.Tensor, x: torch.Tensor, qp: QParams) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[qp.axis] = -1
    return t.reshape(shape)


def _inv_scale(qp: QParams) -> torch.Tensor:
    # PyTorch's per-tensor kernel takes the scale as a double and computes 1.0f / scale in double,
    # the per-channel kernel in float; matching both is what makes the results bit-identical.
    if qp.axis is None:
        return (1.0 / qp.scale.double()).float()
    return 1.0 / qp.scale


def _apply(x: torch.Tensor, qp: QParams, fn) -> torch.Tensor:
    if qp.group_size is not None:
        g = _grouped(x, qp.axis, qp.group_size)
        sub = QParams(qp.scale.unsqueeze(-1), qp.zero_point.unsqueeze(-1), qp.qmin, qp.qmax)
        out = fn(g, sub.scale, (1.0 / sub.scale), sub.zero_point, qp)
        moved_shape = x.movedim(qp.axis, 0).shape
        return out.reshape(moved_shape).movedim(0, qp.axis)
    if qp.axis is None:
        return fn(x, qp.scale, _inv_scale(qp), qp.zero_point, qp)
    return fn(x, _broadcast(qp.scale, x, qp), _broadcast(_inv_scale(qp), x, qp), _broadcast(qp.zero_point, x, qp), qp)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes ``clamp(round(x / S) + Z, qmin, qmax)`` (int32 tensor)."""
    return _apply(x, qp, lambda v, s, inv, z, p: torch.clamp(torch.round(v * inv) + z, p.qmin, p.qmax)).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Real values ``S (q - Z)`` of integer codes."""
    return _apply(q.to(torch.float32), qp, lambda v, s, inv, z, p: (v - z) * s)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize, with the straight-through estimator for the gradient.

    The forward value is ``S (clamp(round(x / S) + Z) - Z)``; the gradient with respect to x is
    1 where ``round(x / S) + Z`` lies in [qmin, qmax] and 0 where it was clamped (round() itself
    has zero gradient almost everywhere, so we pretend it is the identity). Written with plain
    tensor operations, so a fake-quantized model exports to ONNX as it is.

    Example:
        >>> y = fake_quantize(x, compute_qparams(x, bits=4, symmetric=False))
    """
    def fq(v, s, inv, z, p):
        code = torch.round(v * inv) + z
        inside = ((code >= p.qmin) & (code <= p.qmax)).to(v.dtype)
        value = (torch.clamp(code, p.qmin, p.qmax) - z) * s
        return value.detach() + (v - v.detach()) * inside.detach()

    return _apply(x, qp, fq)


def sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - x_hat)^2); inf if exact."""
    x, x_hat = x.detach(), x_hat.detach()
    noise = float(((x - x_hat).double() ** 2).sum())
    signal = float((x.double() ** 2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def calibrate_range(batches: Iterable[torch.Tensor], *, method: str = "minmax", bits: int = 8,
                    symmetric: bool = False, percentile: float = 99.99, momentum: float = 0.9,
                    max_samples: int = 1_000_000) -> tuple[float, float]:
    """The clipping range [lo, hi] for activations seen in `batches`.

    minmax: the extremes; moving_average: an exponential moving average of each batch's extremes
    (robust to one odd batch); percentile: the `percentile` and 100 - `percentile` quantiles
    (ignores rare outliers); mse: the clipping of the min-max range that minimizes the mean
    squared error of fake quantization at `bits` (trades clipping error against rounding error).
    """
    if method not in CALIBRATIONS:
        raise WorkbenchError(f"unknown calibration {method!r}; known: {', '.join(CALIBRATIONS)}")
    batches = [b.detach().float().reshape(-1) for b in batches if b.numel()]
    if not batches:
        raise WorkbenchError("the calibration set is empty: pass at least one batch of activations")
    if method == "moving_average":
        lo, hi = float(batches[0].min()), float(batches[0].max())
        for b in batches[1:]:
            lo = momentum * lo + (1 - momentum) * float(b.min())
            hi = momentum * hi + (1 - momentum) * float(b.max())
        return lo, hi
    values = torch.cat(batches)
    lo, hi = float(values.min()), float(values.max())
    if method == "minmax" or lo == hi:
        return lo, hi
    if values.numel() > max_samples:  # quantiles and the MSE search need a sample, not every value
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:max_samples]]
    if method == "percentile":
        q = torch.quantile(values, torch.tensor([1 - percentile / 100, percentile / 100]))
        return float(q[0]), float(q[1])
    best, best_err = (lo, hi), math.inf
    for ratio in torch.linspace(0.3, 1.0, 36).tolist():
        qp = qparams_from_range(torch.tensor(lo * ratio), torch.tensor(hi * ratio), bits=bits, symmetric=symmetric)
        err = float(((fake_quantize(values, qp) - values) ** 2).mean())
        if err < best_err:
            best, best_err = (lo * ratio, hi * ratio), err
    return best


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model: bits (0 = keep float), weight symmetry and granularity, calibration.

    `symmetric` applies to weights; activations always get an asymmetric range.
    """

    weight_bits: int = 8
    act_bits: int = 8
    symmetric: bool = True
    granularity: str = "per-channel"
    group_size: int = 16
    calibration: str = "minmax"

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits != 0:
                _check_bits(bits)
        if self.granularity not in GRANULARITIES:
            raise WorkbenchError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if self.calibration not in CALIBRATIONS:
            raise WorkbenchError(f"unknown calibration {self.calibration!r}; known: {', '.join(CALIBRATIONS)}")
        if self.symmetric and self.weight_bits == 1:
            qrange(1, symmetric=True)  # raises the explanation


class FakeQuantLayer(nn.Module):
    """A Linear/Conv2d whose weight and input activation are fake-quantized.

    Weight qparams are recomputed from the current weight at every forward (so QAT can move
    weights across grid points); the activation range is fixed by calibration and, while
    training (QAT), follows an exponential moving average of the batches.
    """

    def __init__(self, layer: nn.Module, config: QuantConfig, act_range: tuple[float, float] | None):
        super().__init__()
        self.layer = layer
        self.config = config
        self.register_buffer("act_range", torch.tensor(act_range if act_range else (0.0, 0.0)))

    def weight_qparams(self) -> QParams:
        c = self.config
        w = self.layer.weight
        if c.granularity == "per-tensor":
            return compute_qparams(w, bits=c.weight_bits, symmetric=c.symmetric)
        group = c.group_size if c.granularity == "per-group" else None
        if group is not None and (w[0].numel() % group):
            group = None  # a channel not divisible into groups falls back to per-channel
        return compute_qparams(w, bits=c.weight_bits, symmetric=c.symmetric, axis=0, group_size=group)

    def act_qparams(self) -> QParams:
        # Activations always use an asymmetric (unsigned) range, whatever `symmetric` says for
        # weights: after a ReLU they are all >= 0 and a symmetric range would waste half the levels.
        return qparams_from_range(self.act_range[0], self.act_range[1], bits=self.config.act_bits, symmetric=False)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.layer.weight, self.weight_qparams()) if self.config.weight_bits else self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.act_bits:
            if self.training:
                with torch.no_grad():
                    self.act_range.mul_(0.9).add_(0.1 * torch.stack([x.min(), x.max()]))
            x = fake_quantize(x, self.act_qparams())
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        lay = self.layer
        return F.conv2d(x, w, lay.bias, lay.stride, lay.padding, lay.dilation, lay.groups)


def feed_inputs(model: nn.Module, X: torch.Tensor, layers: Mapping[str, nn.Module],
                on_input: Callable[[str, torch.Tensor], None], *, batch_size: int = 256) -> None:
    """Run `X` through `model` in eval mode, without gradients, in batches, calling
    ``on_input(name, input)`` with the input each of `layers` receives; the model's mode is restored."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: on_input(name, args[0].detach()))
             for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(X), batch_size):
                model(X[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def collect_inputs(model: nn.Module, X: torch.Tensor, *, batch_size: int = 256) -> dict[str, list[torch.Tensor]]:
    """The input activations of every Linear/Conv2d (or fake-quantized layer) on X, by layer name."""
    seen: dict[str, list[torch.Tensor]] = {}
    # In a fake-quantized model the wrapper, not the wrapped layer, receives the input.
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, FakeQuantLayer))}
    feed_inputs(model, X, layers, lambda name, x: seen.setdefault(name, []).append(x), batch_size=batch_size)
    return seen


def quantize_model(model: nn.Module, config: QuantConfig, calibration_X: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` with every Linear/Conv2d wrapped in a :class:`FakeQuantLayer` (PTQ).

    Activation ranges are calibrated on `calibration_X` with ``config.calibration`` (None leaves
    them unset, to be loaded from a saved state dict); train the copy (e.g. with
    ``workbench.train.fit``) for quantization-aware training.

    Example:
        >>> qmodel = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8), data.X_train[:512])
    """
    if config.act_bits and calibration_X is not None and len(calibration_X) == 0:
        raise WorkbenchError("the calibration set is empty: activation quantization needs a batch of inputs")
    qmodel = copy.deepcopy(model)
    ranges = {}
    if config.act_bits and calibration_X is not None:  # None: ranges come from a state dict later
        for name, acts in collect_inputs(qmodel, calibration_X).items():
            # Activations are quantized with an asymmetric range (see act_qparams), so the MSE
            # search must score candidate ranges on that same grid.
            ranges[name] = calibrate_range(acts, method=config.calibration, bits=config.act_bits, symmetric=False)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise WorkbenchError(f"{type(model).__name__} has no Linear or Conv2d layer to quantize")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = qmodel.get_submodule(parent) if parent else qmodel
        setattr(owner, child, FakeQuantLayer(getattr(owner, child), config, ranges.get(name)))
    return qmodel.train(model.training)


def layer_sqnr(qmodel: nn.Module) -> dict[str, float]:
    """SQNR (dB) of each fake-quantized layer's weight against its float weight."""
    return {n.removesuffix(".layer") if n.endswith(".layer") else n: sqnr(m.layer.weight, m.quantized_weight())
            for n, m in qmodel.named_modules() if isinstance(m, FakeQuantLayer)}


def packed_bytes(qmodel: nn.Module) -> int:
    """Bytes to store a quantized model: weight codes packed at `weight_bits` bits each, one fp32
    scale and one zero point (at the code width) per tensor/channel/group, float biases, and every
    other parameter/buffer (BatchNorm, LayerNorm, embeddings) in fp32."""
    total_bits = 0
    quantized = set()
    for name, m in qmodel.named_modules():
        if isinstance(m, FakeQuantLayer) and m.config.weight_bits:
            qp = m.weight_qparams()
            total_bits += m.layer.weight.numel() * m.config.weight_bits
            total_bits += qp.scale.numel() * (32 + m.config.weight_bits)
            quantized.add(f"{name}.layer.weight")
    for name, t in qmodel.state_dict().items():
        if name not in quantized and not name.endswith("act_range"):
            total_bits += t.numel() * t.element_size() * 8
    return math.ceil(total_bits / 8)


def int_forward(layer: FakeQuantLayer, x: torch.Tensor, out_qp: QParams) -> torch.Tensor:
    """Integer-only reference for one fake-quantized Linear/Conv2d (per-tensor or per-channel weights).

    int8-style codes in, int32 accumulation of ``(x_q - Z_x)(w_q - Z_w)``, the bias quantized
    with scale ``S_x S_w`` and zero point 0, then requantization by ``M = S_x S_w / S_y`` to the
    output's codes. Returns the output codes (int32); they equal ``quantize(layer(x), out_qp)`` up to
    one step wherever `int_float_gap_bound` is below 1 (compare codes, not dequantized floats).
    """
    if not (layer.config.act_bits and layer.config.weight_bits) or layer.config.granularity == "per-group":
        raise WorkbenchError("the integer reference needs quantized activations and per-tensor or per-channel weights")
    a_qp, w_qp = layer.act_qparams(), layer.weight_qparams()
    xq = quantize(x, a_qp).double() - a_qp.zero_point.double()
    wq = quantize(layer.layer.weight, w_qp).double() - (w_qp.zero_point.double().reshape(-1, *[1] * (x.dim() - 1))
                                                        if w_qp.axis is not None else w_qp.zero_point.double())
    w_scale = w_qp.scale.double()
    acc_scale = a_qp.scale.double() * w_scale                     # per output channel (or scalar)
    if isinstance(layer.layer, nn.Linear):
        acc = xq @ wq.T
    else:
        lay = layer.layer
        acc = F.conv2d(xq, wq, None, lay.stride, lay.padding, lay.dilation, lay.groups)
    if acc.abs().max() >= 2 ** 31:
        raise WorkbenchError("the int32 accumulator would overflow for this layer")
    shape = [1, -1] + [1] * (acc.dim() - 2)
    if layer.layer.bias is not None:
        acc = acc + torch.round(layer.layer.bias.double().reshape(shape) / acc_scale.reshape(shape)
                                if acc_scale.dim() else layer.layer.bias.double().reshape(shape) / acc_scale)
    m = (acc_scale.reshape(shape) if acc_scale.dim() else acc_scale) / out_qp.scale.double()
    codes = torch.round(acc * m) + out_qp.zero_point.double()
    return torch.clamp(codes, out_qp.qmin, out_qp.qmax).to(torch.int32)


def int_float_gap_bound(layer: FakeQuantLayer, x: torch.Tensor, out_qp: QParams) -> torch.Tensor:
    """How far apart, in output steps, `int_forward` and ``quantize(layer(x), out_qp)`` can be before rounding.

    A float32 error bound, so it holds on any CPU and any summation order (AVX2 or AVX-512 kernels,
    1 or 2 threads). With unit roundoff ``u = 2^-24`` and ``gamma_n = n u / (1 - n u)``:

    * the float path rounds ``S_x (q_x - Z_x)`` and ``S_w (q_w - Z_w)`` to float32 (``u`` each), sums
      K products and the bias in some order (at most ``gamma_K`` of ``A = sum |x_hat w_hat| + |b|``
      for any order, Higham's Theorem 3.1 / 3.5), and multiplies by ``1 / S_y`` rounded (``2u``):
      in all at most ``gamma_{K+4} A / S_y`` steps;
    * the integer path rounds the bias to the accumulator grid ``S_x S_w``: at most ``M / 2`` steps,
      ``M = S_x S_w / S_y``; its double-precision requantization adds ~1e-16 relative.

    Where the bound is below 1, the two output codes differ by at most one: two reals less than one
    apart round to integers at most one apart. Returns the bound per output element (float64).
    """
    a_qp, w_qp = layer.act_qparams(), layer.weight_qparams()
    x_hat = fake_quantize(x, a_qp).detach().double().abs()
    w_hat = layer.quantized_weight().detach().double().abs()
    lay = layer.layer
    bias = lay.bias.detach().double().abs() if lay.bias is not None else None
    if isinstance(lay, nn.Linear):
        k = w_hat.shape[1]
        total = F.linear(x_hat, w_hat, bias)
    else:
        k = w_hat[0].numel()
        total = F.conv2d(x_hat, w_hat, bias, lay.stride, lay.padding, lay.dilation, lay.groups)
    u = 2.0 ** -24
    gamma = (k + 4) * u / (1 - (k + 4) * u)
    shape = [1, -1] + [1] * (total.dim() - 2)
    acc_scale = a_qp.scale.double() * w_qp.scale.double()
    m = (acc_scale.reshape(shape) if acc_scale.dim() else acc_scale) / out_qp.scale.double()
    return gamma * total / out_qp.scale.double() + (0.5 * m if lay.bias is not None else 0.0)

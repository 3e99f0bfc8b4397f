"""Weight-only quantization of the GPT's Linear layers: round-to-nearest (RTN) and GPTQ, per output
channel or per group of input columns, symmetric or asymmetric, at 1..16 bits; packing of the codes
into bytes and the memory they really take.

The scale/zero-point math is ``workbench.quant``'s (``compute_qparams`` with ``axis=0`` and
``group_size``; ``fake_quantize``). GPTQ (Frantar et al. 2023) quantizes one column at a time and
spreads each column's error onto the columns not yet quantized through the inverse Hessian
``H = 2 X X^T`` of the layer's inputs, so that ``||W X - Q X||^2`` stays small:

    err = (w_i - q_i) / [H^-1]_ii ;   W[:, i:] -= err [H^-1]_{i, i:}

with ``H^-1`` taken as the upper Cholesky factor of the damped inverse (damping ``percdamp * mean diag H``),
updates applied lazily in blocks of 128 columns, and group scales computed from the (already updated)
weights when the group's first column is reached. With a diagonal H no error is fed forward and GPTQ
is RTN exactly.

Storage convention (``PackedWeight.nbytes``): codes packed at `bits` bits each, one float32 scale per
group (per row when per-channel), and, only when asymmetric, one zero point per group packed at `bits`
bits. Bits per weight = ``bits + 32 / g`` (symmetric) or ``bits + (32 + bits) / g`` (asymmetric).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import WorkbenchError
from ..quant import QParams, _check_bits, compute_qparams, fake_quantize, qrange, quantize
from .calib import InputStats, block_linears, check_calibration, sequential
from .gpt import GPT

__all__ = ["WeightQuant", "rtn", "gptq", "PackedWeight", "pack_bits", "unpack_bits", "pack",
           "quantize_weights", "memory", "closed_form_bits_per_weight", "layer_error"]


@dataclass(frozen=True)
class WeightQuant:
    """Weight-only settings: bits (1..16), group size (None = one scale per output channel), symmetry."""

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        qrange(self.bits, symmetric=self.symmetric)  # 1-bit symmetric explains itself
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise WorkbenchError(f"group_size must be a positive integer or None (per channel), got {g!r}")

    def check(self, weight: torch.Tensor, name: str = "the layer") -> int:
        """The group width for `weight` (its input width when per-channel); a WorkbenchError if g does not divide it."""
        cin = weight.shape[1]
        g = self.group_size or cin
        if cin % g:
            raise WorkbenchError(f"group_size {g} does not divide the input width {cin} of {name}; "
                                 f"choose a divisor of {cin} (e.g. 32, 64 or 128 where they divide it)")
        return g

    def label(self) -> str:
        return f"int{self.bits} {'g' + str(self.group_size) if self.group_size else 'per-channel'}" \
               f"{'' if self.symmetric else ' asym'}"


def _qparams(w: torch.Tensor, spec: WeightQuant) -> QParams:
    """Per-row qparams of the columns `w` (rows, cols)."""
    return compute_qparams(w, bits=spec.bits, symmetric=spec.symmetric, axis=0)


def rtn(weight: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    """Round to nearest: (dequantized weight, integer codes, qparams) with min-max scales per row or group.

    Example:
        >>> w_hat, codes, qp = rtn(layer.weight, WeightQuant(bits=4, group_size=32))
    """
    w = weight.detach().float()
    g = spec.check(w)
    qp = compute_qparams(w, bits=spec.bits, symmetric=spec.symmetric, axis=0,
                         group_size=g if g < w.shape[1] else None)
    if qp.group_size is None:  # store per-channel as one group per row
        qp = QParams(qp.scale[:, None], qp.zero_point[:, None], qp.qmin, qp.qmax, axis=0, group_size=w.shape[1])
    return fake_quantize(w, qp).detach(), quantize(w, qp), qp


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuant, *, percdamp: float = 0.01,
         blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    """GPTQ: (dequantized weight, codes, qparams) minimizing ``||W X - Q X||^2`` column by column.

    Args:
        weight: (rows, cols). hessian: (cols, cols), ``2 X X^T / n`` of the inputs (any positive multiple).
        spec: bits, group size, symmetry. percdamp: damping as a fraction of the mean diagonal.
        blocksize: columns per lazy batch update.

    Example:
        >>> w_hat, codes, qp = gptq(layer.weight, stats.hessian, WeightQuant(bits=3, group_size=64))
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    g = spec.check(W)
    H = hessian.detach().float().clone()
    if H.shape != (cols, cols):
        raise WorkbenchError(f"the Hessian has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    dead = H.diagonal() == 0  # inputs that are always 0: their columns cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    scales = torch.zeros(rows, cols // g)
    zeros = torch.zeros(rows, cols // g, dtype=torch.int64)
    qp = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a group starts: its scale from the weights as they are now
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                qp = _qparams(current, spec)
                scales[:, col // g], zeros[:, col // g] = qp.scale, qp.zero_point
            w = W1[:, i]
            q = fake_quantize(w, qp)
            Q[:, col] = q
            codes[:, col] = quantize(w, qp)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, codes, QParams(scales, zeros, qp.qmin, qp.qmax, axis=0, group_size=g)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers in [0, 2^bits) packed little-endian into ``ceil(n bits / 8)`` uint8 bytes."""
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise WorkbenchError(f"values to pack must be in [0, {2 ** bits}), got [{int(flat.min())}, {int(flat.max())}]")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: the first `n` values (int64)."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[:n * bits]
    return (stream.view(n, bits) << torch.arange(bits)).sum(1)


@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight as stored: packed codes, float32 scales, packed zero points (asymmetric only)."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    qmin: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero_point) if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.shape
        ngroups = cols // self.group_size
        # codes and zero points are stored offset by -qmin so that every one is unsigned
        q = unpack_bits(self.codes, self.bits, rows * cols).view(rows, ngroups, self.group_size) + self.qmin
        z = (torch.zeros(rows, ngroups, dtype=torch.int64) if self.zero_point is None else
             unpack_bits(self.zero_point, self.bits, rows * ngroups).view(rows, ngroups) + self.qmin)
        return ((q - z[..., None]).float() * self.scale[..., None]).view(rows, cols)


def pack(codes: torch.Tensor, qp: QParams, *, symmetric: bool) -> PackedWeight:
    """Pack integer codes and their per-group qparams (``scale`` of shape (rows, groups))."""
    bits = qp.bits
    rows, cols = codes.shape
    zp = None if symmetric else pack_bits(qp.zero_point - qp.qmin, bits)
    return PackedWeight(shape=(rows, cols), bits=bits, group_size=qp.group_size, symmetric=symmetric, qmin=qp.qmin,
                        codes=pack_bits(codes - qp.qmin, bits), scale=qp.scale.float().contiguous(), zero_point=zp)


def closed_form_bits_per_weight(bits: int, group_size: int, *, symmetric: bool) -> float:
    """``bits + 32 / g`` (+ ``bits / g`` for the zero point when asymmetric), before byte rounding."""
    return bits + (32 + (0 if symmetric else bits)) / group_size


def layer_error(weight: torch.Tensor, w_hat: torch.Tensor, X: torch.Tensor) -> float:
    """``||W X - Q X||^2`` over the rows of X (n, cols), in float64."""
    d = (weight.detach().double() - w_hat.detach().double()) @ X.detach().double().T
    return float((d ** 2).sum())


def quantize_weights(model: GPT, spec: WeightQuant, *, method: str = "rtn", calib: torch.Tensor | None = None,
                     percdamp: float = 0.01, blocksize: int = 128) -> tuple[GPT, dict[str, PackedWeight]]:
    """A copy of `model` whose block Linears hold their quantized (dequantized float) weights, and the packed weights.

    Args:
        method: "rtn", or "gptq" (needs `calib`, token ids (sequences, length) from the train split;
            blocks are processed in order on inputs from the already-quantized earlier blocks).

    Example:
        >>> qmodel, packed = quantize_weights(model, WeightQuant(4, 32), method="gptq", calib=calibration_ids(corpus))
    """
    if method not in ("rtn", "gptq"):
        raise WorkbenchError(f"unknown weight quantization method {method!r}; known: rtn, gptq")
    for name, layer in block_linears(model).items():
        spec.check(layer.weight, name)  # every layer checked before any work
    if method == "gptq":
        if calib is None:
            raise WorkbenchError("GPTQ needs a calibration set: pass calib=calibration_ids(corpus)")
        check_calibration(calib)
    qmodel = copy.deepcopy(model).eval()
    packed: dict[str, PackedWeight] = {}

    def apply(name: str, layer: nn.Linear, stats: InputStats | None) -> None:
        if stats is None:
            w_hat, codes, qp = rtn(layer.weight, spec)
        else:
            w_hat, codes, qp = gptq(layer.weight, stats.hessian, spec, percdamp=percdamp, blocksize=blocksize)
        with torch.no_grad():
            layer.weight.copy_(w_hat)
        packed[name] = pack(codes, qp, symmetric=spec.symmetric)

    if method == "gptq":
        sequential(qmodel, calib, apply)
    else:
        for name, layer in block_linears(qmodel).items():
            apply(name, layer, None)
    return qmodel, packed


def memory(packed: dict[str, PackedWeight]) -> dict[str, float]:
    """Bytes of the packed weights (codes, scales, zero points) and the bits per weight they amount to."""
    weights = sum(p.shape[0] * p.shape[1] for p in packed.values())
    code_b = sum(p.codes.numel() for p in packed.values())
    scale_b = sum(p.scale.numel() * p.scale.element_size() for p in packed.values())
    zero_b = sum(p.zero_point.numel() for p in packed.values() if p.zero_point is not None)
    total = code_b + scale_b + zero_b
    return {"weights": weights, "code_bytes": code_b, "scale_bytes": scale_b, "zero_point_bytes": zero_b,
            "bytes": total, "fp32_bytes": 4 * weights, "bits_per_weight": 8 * total / weights}

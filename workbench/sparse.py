"""Sparse storage formats: the bytes a pruned tensor needs as CSR, as bitmask + values, or with relative indices.

Every size is counted on the real array (its real non-zeros and, for relative indexing, its real
gaps), so "CSR only pays off below 40% density" is a measured fact about this layer::

    sparse_sizes(layer.weight, value_bits=8).best          # "dense", "csr", "bitmask" or "relative"
    model_sparse_sizes(model)["total"].relative             # bytes of the whole pruned model
    break_even_density("csr", shape=(300, 784))             # the density below which CSR wins
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import WorkbenchError

__all__ = ["SparseSizes", "relative_entries", "sparse_sizes", "model_sparse_sizes", "break_even_density"]

# Byte convention: every array a format stores separately is rounded up to whole bytes on its own
# (ceil(bits / 8)); the relative-index format stores (value, gap) pairs as one packed bit stream,
# so it is rounded up once.

_SPARSE_FORMATS = ("csr", "bitmask", "relative")
_INT_FIELDS = ("numel", "nonzero", "dense", "csr", "bitmask", "relative", "relative_entries")


@dataclass(frozen=True)
class SparseSizes:
    """Bytes one weight tensor needs in dense and in three sparse formats, counted on the real array.

    Attributes:
        numel: Number of elements.
        nonzero: Number of elements that are not exactly zero.
        dense: ``ceil(numel * value_bits / 8)``.
        csr: Values ``ceil(nnz * value_bits / 8)`` + column indices ``ceil(nnz * index_bits / 8)``
            + row pointers ``ceil((rows + 1) * index_bits / 8)``, on the ``(shape[0], -1)`` view.
        bitmask: Mask ``ceil(numel / 8)`` + values ``ceil(nnz * value_bits / 8)``.
        relative: Deep Compression relative indexing,
            ``ceil(relative_entries * (value_bits + relative_index_bits) / 8)``.
        relative_entries: Stored (value, gap) pairs: the non-zeros plus the filler zeros.
    """

    numel: int
    nonzero: int
    dense: int
    csr: int
    bitmask: int
    relative: int
    relative_entries: int

    @property
    def density(self) -> float:
        """Fraction of elements that are non-zero."""
        return self.nonzero / self.numel

    @property
    def relative_fillers(self) -> int:
        """Filler zeros the relative-index format inserts to bridge gaps too long for its index bits."""
        return self.relative_entries - self.nonzero

    @property
    def best(self) -> str:
        """Name of the smallest format ("dense", "csr", "bitmask" or "relative"); ties go to the earlier."""
        sizes = {"dense": self.dense, "csr": self.csr, "bitmask": self.bitmask, "relative": self.relative}
        return min(sizes, key=sizes.__getitem__)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _ceil_bytes(bits: int) -> int:
    return -(-bits // 8)


def _check_bits(name: str, bits: Any, meaning: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 64:
        raise WorkbenchError(f"{name} must be an integer from 1 to 64 ({meaning}), got {bits!r}")
    return int(bits)


def _nonzero_mask(weight: Any) -> np.ndarray:
    """Boolean array of the tensor's non-zeros, same shape; validates the input."""
    if isinstance(weight, torch.Tensor):
        t = weight.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        mask = (t != 0).cpu().numpy()
    elif isinstance(weight, np.ndarray):
        if weight.dtype.kind not in "biufc":
            raise WorkbenchError(
                f"cannot measure sparse storage of a numpy array of dtype {weight.dtype}: "
                "expected numbers (bool, integer, float or complex)"
            )
        mask = weight != 0
    else:
        raise WorkbenchError(
            f"cannot measure sparse storage of a {type(weight).__name__}: "
            "expected a torch.Tensor or a numpy.ndarray of numbers"
        )
    if mask.size == 0:
        raise WorkbenchError(f"cannot measure sparse storage of an empty tensor (shape {tuple(mask.shape)})")
    return mask


def relative_entries(keep: np.ndarray | torch.Tensor, *, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative positions of the True entries of `keep` (flattened row-major).

    Each entry stores its gap to the previous one; the previous position starts at 0, so the first
    entry stores its absolute position. A gap above ``2**index_bits - 1`` is bridged by filler
    entries (a stored zero), each advancing by that maximum. :func:`sparse_sizes` counts these
    entries and ``workbench.coding.encode`` writes them.

    Args:
        keep: Boolean mask of the stored values, any shape.
        index_bits: Bits per gap (5 in the paper for fc layers), 1..64.

    Returns:
        ``(gaps, real)``: the int64 gap of every entry, and which entries are real (not fillers).
        ``np.cumsum(gaps)[real]`` gives back the positions of the True entries.

    Example:
        >>> relative_entries(np.array([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool), index_bits=2)
        (array([1, 3, 3, 3]), array([ True, False, False,  True]))
    """
    index_bits = _check_bits("index_bits", index_bits, "bits per relative gap, e.g. 5 as in Deep Compression")
    # A gap is a difference of positions, below 2**63: wider gap fields never need a filler.
    top = min(2**index_bits - 1, np.iinfo(np.int64).max)
    positions = np.flatnonzero(np.asarray(keep).reshape(-1))
    gaps = np.diff(positions, prepend=0)
    # A gap g > top needs ceil(g / top) - 1 fillers, each advancing by top.
    fillers = np.maximum(gaps - 1, 0) // top
    slots = np.cumsum(fillers + 1) - 1  # where each real entry lands, after its fillers
    out = np.full(int(slots[-1]) + 1 if len(slots) else 0, top, dtype=np.int64)
    out[slots] = gaps - fillers * top
    real = np.zeros(len(out), dtype=bool)
    real[slots] = True
    return out, real


def sparse_sizes(weight: torch.Tensor | np.ndarray, *, value_bits: int = 32, index_bits: int = 32,
                 relative_index_bits: int = 5) -> SparseSizes:
    """Bytes `weight` needs stored dense, as CSR, as bitmask + values, and with relative indices.

    Everything is counted on the actual array: its real non-zeros and, for relative indexing, its
    real gaps. Conventions:

    - Rounding: each separately stored array is rounded up to whole bytes on its own (CSR's
      values, column indices and row pointers; the bitmask and its values); the relative format's
      packed (value, gap) stream is rounded up once.
    - CSR works on the 2-D view ``(shape[0], prod(shape[1:]))``: one row per output channel or
      neuron (a conv weight is ``(out, in*kh*kw)``). A 1-D or 0-D tensor is a single row.
    - Relative indexing (Han et al. 2016, Deep Compression, Sec. 2 / Fig. 2) walks the tensor
      flattened in row-major order and stores, for each non-zero, its value and its gap to the
      previous non-zero in `relative_index_bits` bits. The previous position starts at 0, so the
      first entry stores its absolute index (a non-zero at index 0 has gap 0). Gaps go up to
      ``2**relative_index_bits - 1``; a longer gap gets a filler entry (a zero value) every
      ``2**relative_index_bits - 1`` positions, i.e. ``ceil(gap / max) - 1`` fillers, each costing a
      value and an index. Trailing zeros after the last non-zero cost nothing.

    Args:
        weight: The tensor or array; any numeric dtype (the dtype is not used for sizes).
        value_bits: Bits per stored value: 32 for fp32, 8 for int8, 5-8 for cluster indices.
        index_bits: Bits per CSR column index and row pointer (32: int32, as scipy and torch use).
        relative_index_bits: Bits per gap in the relative-index format.

    Returns:
        The sizes in bytes and the counts they were computed from.

    Raises:
        WorkbenchError: If a bit width is not in 1..64, or the input is empty or not numeric.

    Example:
        >>> sparse_sizes(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [3, 4, 0, 5]])).csr
        56
    """
    value_bits = _check_bits("value_bits", value_bits, "bits per stored value, e.g. 32 for fp32")
    index_bits = _check_bits("index_bits", index_bits, "bits per CSR index, e.g. 32 for int32")
    relative_index_bits = _check_bits("relative_index_bits", relative_index_bits,
                                      "bits per relative gap, e.g. 5 as in Deep Compression")
    mask = _nonzero_mask(weight)
    numel = int(mask.size)
    nnz = int(np.count_nonzero(mask))
    rows = mask.shape[0] if mask.ndim >= 2 else 1
    entries = len(relative_entries(mask, index_bits=relative_index_bits)[0])
    return SparseSizes(
        numel=numel,
        nonzero=nnz,
        dense=_ceil_bytes(numel * value_bits),
        csr=_ceil_bytes(nnz * value_bits) + _ceil_bytes(nnz * index_bits) + _ceil_bytes((rows + 1) * index_bits),
        bitmask=_ceil_bytes(numel) + _ceil_bytes(nnz * value_bits),
        relative=_ceil_bytes(entries * (value_bits + relative_index_bits)),
        relative_entries=entries,
    )


def model_sparse_sizes(model: nn.Module, *, layers: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
                       **kwargs: Any) -> dict[str, SparseSizes]:
    """Sparse storage of each prunable layer's ``weight``, by module name, plus a ``"total"`` entry.

    Biases are left out: pruning leaves them dense and they are a tiny fraction of the bytes.

    Args:
        model: The (pruned) model.
        layers: Module types whose ``weight`` counts.
        **kwargs: Passed to :func:`sparse_sizes` (``value_bits``, ``index_bits``,
            ``relative_index_bits``).

    Returns:
        ``{module_name: SparseSizes, ..., "total": SparseSizes}``; the total sums every integer field.

    Raises:
        WorkbenchError: If the model has no such layer, or for bad `kwargs` (see :func:`sparse_sizes`).

    Example:
        >>> model_sparse_sizes(model, value_bits=8)["total"].best
    """
    sizes: dict[str, SparseSizes] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, layers) and isinstance(weight, torch.Tensor):
            sizes[name or type(module).__name__] = sparse_sizes(weight, **kwargs)
    if not sizes:
        kinds = ", ".join(t.__name__ for t in layers)
        raise WorkbenchError(f"found no layer with a weight of type {kinds} in the model to measure")
    if "total" in sizes:
        raise WorkbenchError("a module of the model is named 'total', which clashes with the summary entry")
    sizes["total"] = SparseSizes(**{f: sum(getattr(s, f) for s in sizes.values()) for f in _INT_FIELDS})
    return sizes


def break_even_density(fmt: str, *, shape: tuple[int, ...], value_bits: int = 32, index_bits: int = 32,
                       relative_index_bits: int = 5, seed: int = 0) -> float:
    """Highest density at which sparse format `fmt` takes fewer bytes than dense, for a given shape.

    With ``v = value_bits``, ``i = index_bits``, ``rows = shape[0]`` (1 for a 1-D shape) and
    ``n = numel``, and ignoring rounding to bytes (exact when the bit counts are multiples of 8):

    - ``"csr"``: ``nnz*(v+i) + (rows+1)*i < n*v``, i.e. ``density < (v - (rows+1)*i/n) / (v+i)``.
    - ``"bitmask"``: ``n + nnz*v < n*v`` bits, i.e. ``density < 1 - 1/v`` (0.96875 for fp32).

    Both are returned in closed form, clipped to [0, 1]. ``"relative"`` has no closed form because
    the filler count depends on where the zeros are; it is found by binary search on the number of
    non-zeros of a seeded, uniformly random sparsity pattern of this shape (nested as the density
    grows, so the size only grows), measured with :func:`sparse_sizes`. It returns ``nnz / n`` for
    the largest such nnz, and is at most ``v / (v + relative_index_bits)``.

    Raises:
        WorkbenchError: For an unknown `fmt`, a shape with no elements, or bad bit widths.

    Example:
        >>> break_even_density("bitmask", shape=(300, 784))
        0.96875
    """
    if fmt not in _SPARSE_FORMATS:
        raise WorkbenchError(f"unknown sparse format {fmt!r}: expected one of {', '.join(_SPARSE_FORMATS)}")
    value_bits = _check_bits("value_bits", value_bits, "bits per stored value, e.g. 32 for fp32")
    index_bits = _check_bits("index_bits", index_bits, "bits per CSR index, e.g. 32 for int32")
    relative_index_bits = _check_bits("relative_index_bits", relative_index_bits,
                                      "bits per relative gap, e.g. 5 as in Deep Compression")
    shape = tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise WorkbenchError(f"shape must be a tuple of positive integers, got {shape!r}")
    numel = int(np.prod(shape, dtype=np.int64))
    rows = shape[0] if len(shape) >= 2 else 1
    if fmt == "csr":
        density = (value_bits - (rows + 1) * index_bits / numel) / (value_bits + index_bits)
    elif fmt == "bitmask":
        density = 1 - 1 / value_bits
    else:
        order = np.random.default_rng(seed).permutation(numel)
        dense = _ceil_bytes(numel * value_bits)

        def smaller(k: int) -> bool:
            mask = np.zeros(numel, dtype=bool)
            mask[order[:k]] = True
            size = sparse_sizes(mask.reshape(shape), value_bits=value_bits,
                                relative_index_bits=relative_index_bits).relative
            return size < dense

        lo, hi = 0, numel  # smaller(0) holds (nothing stored); smaller(numel) never does (a gap per value)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if smaller(mid) else (lo, mid)
        density = lo / numel
    return float(min(max(density, 0.0), 1.0))

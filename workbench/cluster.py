"""Deep Compression (Han et al., ICLR 2016): k-means weight sharing, centroid fine-tuning, Huffman coding.

The pipeline is prune (``workbench.prune``) -> :func:`share_weights` (per layer, the surviving
weights are clustered into ``2**bits`` shared values) -> :func:`finetune_centroids` (trained
quantization: each centroid moves by the sum of its members' gradients) -> :func:`encode` (cluster
indices and relative positions of the non-zeros, each Huffman-coded into real bit streams).
:func:`decode` rebuilds the weights bit for bit, and ``Encoded.nbytes()`` counts every byte a
decoder needs, so a compression ratio is a measured fact, not an estimate::

    codebooks = share_weights(model, bits=5)
    finetune_centroids(model, codebooks, data, epochs=3)
    enc = encode(model, codebooks)
    compression_ratio(measure.param_bytes(model), enc)
"""

from __future__ import annotations

import contextlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .data import Dataset
from .errors import WorkbenchError
from .prune import PRUNABLE, prunable_layers
from .train import History, fit

__all__ = [
    "INITS", "Codebook", "init_centroids", "kmeans_1d", "layer_bits", "share_weights", "centroid_grad", "tied",
    "finetune_centroids", "huffman_code_lengths", "canonical_codes", "encode_symbols", "decode_symbols",
    "relative_entries",
    "Encoded", "encode", "decode", "compression_ratio",
]

INITS = ("linear", "density", "random")
LLOYD_ITERS = 300
HEADER_BYTES = 4  # per layer: the number of (index, gap) entries as a uint32, so the decoder knows where to stop


# ----------------------------------------------------------------------------------------------
# Weight sharing


@dataclass
class Codebook:
    """The shared weights of one layer: ``weight = centroids[indices]`` where ``indices >= 0``, else 0.

    Attributes:
        centroids: ``(2**bits,)`` float32 shared values.
        indices: int64, shaped like the weight. ``-1`` marks a pruned weight (an exact zero): pruned
            weights are not clustered (Han et al. cluster the surviving weights only) and stay zero.
        bits: bits per index before Huffman coding (``len(centroids) == 2**bits``).
    """

    centroids: torch.Tensor
    indices: torch.Tensor
    bits: int

    def weight(self) -> torch.Tensor:
        """The weight tensor this codebook stands for (float32, zeros where pruned)."""
        keep = self.indices >= 0
        return torch.where(keep, self.centroids[self.indices.clamp(min=0)], torch.zeros((), dtype=torch.float32))


def _check_bits(bits: object, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise WorkbenchError(f"weight-sharing bits for {where} must be an integer from 1 to 16 "
                             f"(2**bits shared values; the paper uses 8 for conv and 5 for fc layers), got {bits!r}")
    return int(bits)


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each x (centroids sorted ascending; a tie goes to the lower one)."""
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x, side="left")


def _far_points(x: np.ndarray, residual: np.ndarray, n: int, *, exclude: np.ndarray) -> np.ndarray:
    """Up to `n` distinct values of x farthest from their centroids (as scikit-learn relocates empty clusters).

    If x has too few distinct values, the remaining clusters get duplicates of the last one (and stay empty).
    """
    taken = set(exclude.tolist())
    picks: list[float] = []
    for i in np.argsort(-np.abs(residual), kind="stable"):
        if x[i] not in taken:
            taken.add(x[i])
            picks.append(x[i])
            if len(picks) == n:
                break
    picks += [picks[-1] if picks else exclude[0]] * (n - len(picks))
    return np.array(picks)


def init_centroids(x: np.ndarray | torch.Tensor, k: int, *, init: str = "linear", seed: int = 0) -> np.ndarray:
    """The k starting centroids of :func:`kmeans_1d`, sorted ascending (float64).

    "linear": evenly spaced between min(x) and max(x); "density": the quantiles of x at evenly
    spaced probabilities (dense regions get more centroids); "random" (Forgy): k distinct points
    of x drawn with `seed`.
    """
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise WorkbenchError(f"k-means needs a positive integer number of clusters, got {k!r}")
    if k > len(x):
        raise WorkbenchError(f"k-means with {k} clusters needs at least {k} values, got {len(x)}: "
                             "use fewer bits for this layer (or prune it less)")
    if init == "linear":
        return np.linspace(x.min(), x.max(), k)
    if init == "density":
        return np.quantile(x, np.linspace(0.0, 1.0, k))
    if init == "random":
        return np.sort(x[np.random.default_rng(seed).choice(len(x), size=k, replace=False)])
    raise WorkbenchError(f"unknown k-means init {init!r}; expected one of {', '.join(INITS)}")


def kmeans_1d(x: np.ndarray | torch.Tensor, k: int, *, init: str = "linear", iters: int = LLOYD_ITERS,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars: minimize ``sum_i (x_i - c_{a(i)})**2`` over centroids c and assignments a.

    In one dimension the nearest centroid is found by binary search on the midpoints between sorted
    centroids. Each iteration assigns every point, then moves each centroid to the mean of its
    points; it stops after `iters` iterations or as soon as no assignment changes (a fixed point:
    further iterations change nothing). A cluster left empty is moved onto the point farthest from
    its centroid, as scikit-learn does: after pruning, the weights are bimodal and linear
    initialization puts centroids in the empty gap around zero, which would otherwise waste codes.

    Args:
        x: the values (any shape; flattened, computed in float64).
        k: number of clusters, at most ``len(x)``.
        init: "linear" (the paper's choice: it keeps the few large weights, which matter most,
            represented), "density" or "random"; see :func:`init_centroids`.
        iters: maximum number of Lloyd iterations.
        seed: for ``init="random"``.

    Returns:
        ``(centroids, labels)``: float64 centroids sorted ascending, int64 label per point.

    Example:
        >>> kmeans_1d(np.array([0.0, 0.1, 1.0, 1.1]), 2)[0]
        array([0.05, 1.05])
    """
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    c = init_centroids(x, k, init=init, seed=seed)
    labels = _assign(x, c)
    for _ in range(int(iters)):
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=x, minlength=k)
        new_c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            new_c[empty] = _far_points(x, x - c[labels], len(empty), exclude=new_c[counts > 0])
        c = np.sort(new_c)
        new = _assign(x, c)
        if np.array_equal(new, labels):
            break
        labels = new
    return c, labels.astype(np.int64)


def layer_bits(model: nn.Module, *, conv: int = 8, fc: int = 5) -> dict[str, int]:
    """Bits per layer as in the paper: `conv` for every Conv2d, `fc` for every Linear layer.

    Example:
        >>> layer_bits(lenet5)
        {'features.0': 8, 'features.2': 8, 'classifier.1': 5, 'classifier.3': 5}
    """
    return {n: conv if isinstance(m, nn.Conv2d) else fc for n, m in prunable_layers(model).items()}


def share_weights(model: nn.Module, *, bits: int | Mapping[str, int], seed: int = 0, init: str = "linear",
                  iters: int = LLOYD_ITERS) -> dict[str, Codebook]:
    """Cluster each Linear/Conv2d layer's non-zero weights into ``2**bits`` shared values, in place.

    Exact zeros (pruned weights) are not clustered and stay zero. Every other weight is replaced by
    its centroid, so the layer holds at most ``2**bits`` distinct non-zero values and each weight
    can be stored as a `bits`-bit index into the layer's codebook.

    Args:
        model: modified in place (its prunable layers' ``weight``).
        bits: one width for all layers, or ``{layer name: bits}`` naming every layer (see
            :func:`layer_bits` for the paper's conv 8 / fc 5).
        seed: for ``init="random"`` (each layer draws from its own stream).
        init: k-means initialization, see :func:`kmeans_1d`.
        iters: maximum Lloyd iterations.

    Returns:
        ``{layer name: Codebook}``.

    Raises:
        WorkbenchError: bits outside 1..16, an unknown or missing layer in `bits`, or a layer with
            fewer non-zero weights than clusters.

    Example:
        >>> codebooks = share_weights(model, bits=layer_bits(model, conv=8, fc=5))
    """
    layers = prunable_layers(model)
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers))
        missing = [n for n in layers if n not in bits]
        if unknown or missing:
            raise WorkbenchError(
                f"the bits map must name exactly the prunable layers ({', '.join(layers)}); "
                + (f"unknown: {', '.join(map(str, unknown))}" if unknown else f"missing: {', '.join(missing)}"))
        widths = {n: _check_bits(bits[n], n) for n in layers}
    else:
        b = _check_bits(bits, "all layers")
        widths = dict.fromkeys(layers, b)
    if init not in INITS:
        raise WorkbenchError(f"unknown k-means init {init!r}; expected one of {', '.join(INITS)}")
    codebooks = {}
    for i, (name, layer) in enumerate(layers.items()):
        w = layer.weight.detach()
        keep = w != 0
        k = 2 ** widths[name]
        n = int(keep.sum())
        if n < k:
            fix = f"give it at most {int(math.log2(n))} bits" if n >= 2 else "prune it less"
            raise WorkbenchError(f"layer {name} has {n} non-zero weights, fewer than the {k} clusters of "
                                 f"{widths[name]} bits: {fix}")
        c, labels = kmeans_1d(w[keep], k, init=init, iters=iters, seed=seed * 1000 + i)
        indices = torch.full(w.shape, -1, dtype=torch.int64)
        indices[keep] = torch.from_numpy(labels)
        book = Codebook(torch.from_numpy(c.astype(np.float32)), indices, widths[name])
        with torch.no_grad():
            layer.weight.copy_(book.weight())
        codebooks[name] = book
    return codebooks


# ----------------------------------------------------------------------------------------------
# Trained quantization


def centroid_grad(weight_grad: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    """The gradient of each centroid: the sum of the gradients of the weights that share it (paper Fig. 3).

    ``dL/dc_k = sum_{i: indices_i = k} dL/dw_i``; pruned weights (index -1) belong to no centroid.
    """
    keep = codebook.indices >= 0
    return torch.zeros_like(codebook.centroids).index_add_(0, codebook.indices[keep], weight_grad[keep].float())


class _Tied(nn.Module):
    """A parametrization: the layer's weight *is* ``centroids[indices]`` (zeros where pruned).

    Autograd's backward of the gather is a scatter-add, so ``centroids.grad`` is exactly the sum of
    the member weights' gradients (:func:`centroid_grad`), and every step keeps the weights tied.
    """

    def __init__(self, book: Codebook):
        super().__init__()
        self.centroids = nn.Parameter(book.centroids.detach().clone())
        self.register_buffer("index", book.indices.clamp(min=0))
        self.register_buffer("keep", book.indices >= 0)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return torch.where(self.keep, self.centroids[self.index], torch.zeros((), dtype=self.centroids.dtype))


def _check_codebooks(model: nn.Module, codebooks: Mapping[str, Codebook]) -> dict[str, nn.Module]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    unknown = sorted(set(codebooks) - set(layers))
    if unknown:
        raise WorkbenchError(f"codebook(s) for unknown layer(s) {', '.join(unknown)}; layers: {', '.join(layers)}")
    for name, book in codebooks.items():
        if tuple(book.indices.shape) != tuple(layers[name].weight.shape):
            raise WorkbenchError(f"the codebook of {name} has indices of shape {tuple(book.indices.shape)} but "
                                 f"the weight is {tuple(layers[name].weight.shape)}: share the weights of this model")
    return {n: layers[n] for n in codebooks}


@contextlib.contextmanager
def tied(model: nn.Module, codebooks: Mapping[str, Codebook]) -> Iterator[dict[str, nn.Parameter]]:
    """Tie each layer's weight to its codebook for the duration of the block; yields the centroid parameters.

    Inside, ``layer.weight`` is computed from the centroids, which are the trainable parameters
    (the layer's original weight gets no gradient). On exit the weights are plain parameters again,
    equal to ``centroids[indices]``, and each ``Codebook.centroids`` holds the trained values.

    Example:
        >>> with tied(model, codebooks) as centroids:
        ...     loss(model(x)).backward()   # centroids["fc1"].grad == centroid_grad(...)
    """
    layers = _check_codebooks(model, codebooks)
    params: dict[str, nn.Parameter] = {}
    try:
        for name, layer in layers.items():
            parametrize.register_parametrization(layer, "weight", _Tied(codebooks[name]))
            params[name] = layer.parametrizations.weight[0].centroids
        yield params
    finally:
        for name in params:  # only the layers tied so far, should one of them have failed
            codebooks[name].centroids = params[name].detach().clone()
            parametrize.remove_parametrizations(layers[name], "weight", leave_parametrized=True)


def finetune_centroids(model: nn.Module, codebooks: Mapping[str, Codebook], data: Dataset, *, epochs: int,
                       lr: float = 1e-3, batch_size: int = 64, seed: int = 0, optimizer: str = "adam",
                       progress: bool | None = None) -> History | None:
    """Trained quantization: fine-tune the shared values while every weight stays tied to its centroid.

    Runs :func:`workbench.train.fit` with the layers tied (:func:`tied`): each step moves centroid
    k by the optimizer's update for ``sum_{i in cluster k} dL/dw_i``. Biases (and any other
    parameter that is not a shared weight) are fine-tuned along; they stay float32 in the encoding.
    Deterministic for a given `seed`. Updates `model` and the codebooks' centroids in place.

    Returns:
        The training History, or None for ``epochs=0``.

    Example:
        >>> finetune_centroids(model, codebooks, load("digits28"), epochs=3, lr=1e-4)
    """
    if epochs == 0:
        return None
    with tied(model, codebooks):
        return fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, seed=seed,
                   progress=progress)


# ----------------------------------------------------------------------------------------------
# Huffman coding


def huffman_code_lengths(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Optimal prefix-code lengths for symbol frequencies `counts` (Huffman's algorithm).

    Repeatedly merge the two least frequent nodes; a symbol's code length is its leaf's depth.
    Unused symbols (count 0) get length 0 (no code). A single used symbol gets a 1-bit code.
    Ties are broken by creation order, so the result is deterministic.

    Example:
        >>> huffman_code_lengths([5, 1, 1, 2]).tolist()
        [1, 3, 3, 2]
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    heap = [(int(counts[s]), i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    parent: list[int] = [0] * (2 * len(used) - 1)
    node = len(used)
    while len(heap) > 1:
        (ca, a), (cb, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (ca + cb, node))
        node += 1
    depth = [0] * len(parent)
    for n in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[n] = depth[parent[n]] + 1
    lengths[used] = depth[:len(used)]
    return lengths


def canonical_codes(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (as integers) for code lengths; symbols of length 0 get -1.

    Codes are handed out in order of (length, symbol): each is the previous one plus 1, shifted
    left when the length grows. So a decoder needs only the lengths (the stored table), and codes of
    one length are consecutive integers.

    Example:
        >>> canonical_codes([1, 3, 3, 2]).tolist()   # 0, 110, 111, 10
        [0, 6, 7, 2]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.full(len(lengths), -1, dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths > 0), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


def encode_symbols(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Write each symbol's canonical code (for code `lengths`), most significant bit first, into bytes.

    Returns:
        ``(stream, nbits)``: the bytes (the last one zero-padded) and the number of bits used.

    Example:
        >>> encode_symbols(np.array([0, 3, 1]), np.array([1, 3, 3, 2]))   # 0 10 110 -> 01011000
        (b'X', 6)
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any()):
        raise WorkbenchError("every symbol to encode needs a code (a length > 0 in the table)")
    codes, ls = canonical_codes(lengths)[symbols], lengths[symbols]
    if len(symbols) == 0:
        return b"", 0
    width = int(ls.max())
    j = np.arange(width)
    shift = ls[:, None] - 1 - j
    bits = (codes[:, None] >> np.maximum(shift, 0)) & 1
    bits = bits[shift >= 0].astype(np.uint8)  # row-major: symbol after symbol, code bits in order
    return np.packbits(bits).tobytes(), len(bits)


def decode_symbols(stream: bytes, nbits: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """Read `count` symbols back from a stream written by :func:`encode_symbols` with the same lengths.

    Every bit position is looked at once, vectorized: the `width` bits starting there, read as an
    integer, fall into the left-aligned range of exactly one canonical code (codes increase with
    (length, symbol)). Then a short walk hops from each code's start to the next.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.array(sorted(np.flatnonzero(lengths > 0), key=lambda s: (lengths[s], s)), dtype=np.int64)
    codes, ls = canonical_codes(lengths)[order], lengths[order]
    width = int(ls.max())
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:nbits].astype(np.int64)
    bits = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    # The `width` bits starting at every position, as an integer: the code there, left-aligned.
    window = np.zeros(nbits, dtype=np.int64)
    for j in range(width):
        window = (window << 1) | bits[j:j + nbits]
    # Left-aligned canonical codes increase with (length, symbol): the code starting at a position
    # is the last one whose left-aligned value is <= the window there.
    aligned = codes << (width - ls)
    rank = np.searchsorted(aligned, window, side="right") - 1
    step = ls[rank].tolist()
    pos, starts = 0, []
    for _ in range(count):  # each symbol starts where the previous one ended
        if pos >= nbits:
            raise WorkbenchError("the bit stream ended before all its symbols were decoded: it is damaged")
        starts.append(pos)
        pos += step[pos]
    if pos != nbits:
        raise WorkbenchError(f"decoded {count} symbols in {pos} bits but the stream holds {nbits}: it is damaged")
    return order[rank[starts]]


# ----------------------------------------------------------------------------------------------
# Relative indices and the encoded model


def relative_entries(keep: np.ndarray, *, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative positions of the True entries of `keep` (flattened row-major).

    Same convention as :func:`workbench.measure.sparse_sizes`: each entry stores its gap to the
    previous one (the first its absolute position); a gap above ``2**index_bits - 1`` is bridged by
    filler entries, each advancing by that maximum.

    Returns:
        ``(gaps, real)``: the gap of every entry, and which entries are real (not fillers).
    """
    top = 2 ** index_bits - 1
    positions = np.flatnonzero(np.asarray(keep).reshape(-1))
    gaps = np.diff(positions, prepend=0)
    fillers = np.maximum(gaps - 1, 0) // top
    slots = np.cumsum(fillers + 1) - 1  # where each real entry lands, after its fillers
    out = np.full(int(slots[-1]) + 1 if len(slots) else 0, top, dtype=np.int64)
    out[slots] = gaps - fillers * top
    real = np.zeros(len(out), dtype=bool)
    real[slots] = True
    return out, real


@dataclass
class Encoded:
    """A model's weights after Deep Compression, as the bytes a decoder needs.

    ``layers[name]`` holds, for each shared layer: ``shape``, ``bits``, ``centroids`` (float32
    array), ``entries`` (index/gap pairs, fillers included), ``nonzero``, the two bit streams
    ``index_stream`` (cluster index per entry; symbol ``2**bits`` marks a filler) and ``gap_stream``
    (relative position per entry) with their lengths in bits (``index_bits``, ``gap_bits``), the
    code tables ``index_table`` and ``gap_table`` as stored, and ``bias`` (float32 array or None).
    ``dense`` holds every other tensor of the state dict as it is (e.g. BatchNorm statistics).

    How a code table is stored: canonical Huffman codes are fully determined by their lengths, so a
    table is one byte per symbol of the alphabet (its code length, 0 = unused); the indices'
    alphabet is ``2**bits + 1`` symbols (the last one a filler), the gaps' ``2**relative_index_bits``.
    With ``huffman=False`` every code has the same width, and the table is that width, one byte.
    """

    layers: dict[str, dict]
    relative_index_bits: int
    huffman: bool
    dense: dict[str, np.ndarray] = field(default_factory=dict)

    def _layer_bytes(self, e: dict) -> dict[str, int]:
        return {"index": len(e["index_stream"]), "position": len(e["gap_stream"]),
                "codebook": e["centroids"].nbytes, "tables": len(e["index_table"]) + len(e["gap_table"]),
                "header": HEADER_BYTES, "bias": e["bias"].nbytes if e["bias"] is not None else 0}

    def nbytes(self) -> int:
        """Total bytes: every bit stream, codebook, code table, entry count and float32 bias, plus `dense`."""
        return (sum(sum(self._layer_bytes(e).values()) for e in self.layers.values())
                + sum(a.nbytes for a in self.dense.values()))

    def breakdown(self) -> list[dict]:
        """One row per layer: weights, non-zeros, entries, average index and position bits, and bytes by part."""
        rows = []
        for name, e in self.layers.items():
            parts = self._layer_bytes(e)
            rows.append({"layer": name, "weights": int(np.prod(e["shape"])), "nonzero": e["nonzero"],
                         "entries": e["entries"], "bits": e["bits"],
                         "index_bits_per_entry": e["index_bits"] / max(e["entries"], 1),
                         "position_bits_per_entry": e["gap_bits"] / max(e["entries"], 1),
                         **{f"{k}_bytes": v for k, v in parts.items()}, "bytes": sum(parts.values())})
        return rows


def _table(lengths: np.ndarray, huffman: bool) -> bytes:
    if huffman:
        return bytes(lengths.astype(np.uint8).tolist())
    return bytes([int(lengths.max())])


def _lengths(table: bytes, huffman: bool) -> np.ndarray:
    if huffman:
        return np.frombuffer(table, dtype=np.uint8).astype(np.int64)
    return np.full(2 ** table[0], table[0], dtype=np.int64)


def _fixed_lengths(alphabet_used: int) -> np.ndarray:
    width = max(1, math.ceil(math.log2(alphabet_used)))
    return np.full(2 ** width, width, dtype=np.int64)


def _key(layer: str, tensor: str) -> str:
    """The state-dict key of a layer's tensor (a model that is itself one layer has no prefix)."""
    return f"{layer}.{tensor}" if layer else tensor


def encode(model: nn.Module, codebooks: Mapping[str, Codebook], *, relative_index_bits: int = 5,
           huffman: bool = True) -> Encoded:
    """Encode the shared weights: per layer, relative positions and cluster indices as real bit streams.

    Args:
        model: a model whose shared layers equal their codebooks (after :func:`share_weights` and
            optionally :func:`finetune_centroids`); its other tensors are stored as they are.
        codebooks: ``{layer name: Codebook}`` from :func:`share_weights`.
        relative_index_bits: bits per gap before Huffman coding (5 in the paper for fc layers).
        huffman: True: canonical Huffman codes fitted to each stream's symbol counts. False:
            fixed-width codes (``bits`` per index, ``bits + 1`` if the layer has fillers; and
            `relative_index_bits` per gap), i.e. the paper's size before Huffman coding.

    Returns:
        The :class:`Encoded` model; :func:`decode` gives the weights back exactly.

    Raises:
        WorkbenchError: if a layer's weight no longer equals ``codebook.weight()``.

    Example:
        >>> enc = encode(model, codebooks); enc.nbytes()
    """
    if isinstance(relative_index_bits, bool) or not isinstance(relative_index_bits, int) or \
            not 1 <= relative_index_bits <= 16:
        raise WorkbenchError(f"relative_index_bits must be an integer from 1 to 16 (5 in the paper), "
                             f"got {relative_index_bits!r}")
    layers = _check_codebooks(model, codebooks)
    out: dict[str, dict] = {}
    for name, layer in layers.items():
        book = codebooks[name]
        if not torch.equal(layer.weight.detach().float(), book.weight()):
            raise WorkbenchError(f"the weights of {name} no longer equal their codebook's shared values; "
                                 "encode right after share_weights / finetune_centroids")
        flat = book.indices.reshape(-1).numpy()
        gaps, real = relative_entries(flat >= 0, index_bits=relative_index_bits)
        k = len(book.centroids)
        symbols = np.full(len(gaps), k, dtype=np.int64)  # symbol k: a filler (a stored zero)
        symbols[real] = flat[flat >= 0]
        if huffman:
            idx_len = huffman_code_lengths(np.bincount(symbols, minlength=k + 1))
            gap_len = huffman_code_lengths(np.bincount(gaps, minlength=2 ** relative_index_bits))
        else:
            idx_len = _fixed_lengths(k + 1 if (~real).any() else k)
            gap_len = _fixed_lengths(2 ** relative_index_bits)
        index_stream, index_bits = encode_symbols(symbols, idx_len)
        gap_stream, gap_bits = encode_symbols(gaps, gap_len)
        bias = getattr(layer, "bias", None)
        out[name] = {
            "shape": tuple(book.indices.shape), "bits": book.bits, "centroids": book.centroids.numpy().copy(),
            "entries": len(gaps), "nonzero": int(real.sum()),
            "index_table": _table(idx_len, huffman), "gap_table": _table(gap_len, huffman),
            "index_stream": index_stream, "index_bits": index_bits,
            "gap_stream": gap_stream, "gap_bits": gap_bits,
            "bias": bias.detach().numpy().copy() if bias is not None else None,
        }
    coded = {_key(n, "weight") for n in out} | {_key(n, "bias") for n, e in out.items() if e["bias"] is not None}
    dense = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if k not in coded}
    return Encoded(layers=out, relative_index_bits=relative_index_bits, huffman=huffman, dense=dense)


def decode(encoded: Encoded) -> dict[str, torch.Tensor]:
    """Rebuild the state dict from the bit streams: ``model.load_state_dict(decode(enc))``.

    Each weight is the codebook value of its decoded index, at the position given by the running
    sum of the decoded gaps; fillers and all other positions are zero.
    """
    state: dict[str, torch.Tensor] = {}
    for name, e in encoded.layers.items():
        k = len(e["centroids"])
        idx_len = _lengths(e["index_table"], encoded.huffman)
        gap_len = _lengths(e["gap_table"], encoded.huffman)
        symbols = decode_symbols(e["index_stream"], e["index_bits"], idx_len, e["entries"])
        gaps = decode_symbols(e["gap_stream"], e["gap_bits"], gap_len, e["entries"])
        positions = np.cumsum(gaps)
        real = symbols < k
        flat = np.zeros(int(np.prod(e["shape"])), dtype=np.float32)
        flat[positions[real]] = e["centroids"][symbols[real]]
        state[_key(name, "weight")] = torch.from_numpy(flat.reshape(e["shape"]))
        if e["bias"] is not None:
            state[_key(name, "bias")] = torch.from_numpy(e["bias"].copy())
    state.update({k: torch.from_numpy(v.copy()) for k, v in encoded.dense.items()})
    return state


def compression_ratio(dense_bytes: int, encoded: Encoded) -> float:
    """``dense_bytes / encoded.nbytes()``; pass the float32 size, e.g. ``measure.param_bytes(dense_model)``."""
    if isinstance(dense_bytes, bool) or not isinstance(dense_bytes, (int, np.integer)) or dense_bytes <= 0:
        raise WorkbenchError(f"dense_bytes must be a positive number of bytes, got {dense_bytes!r}")
    return int(dense_bytes) / encoded.nbytes()

"""Deep Compression's weight sharing (Han et al., ICLR 2016): 1-D k-means codebooks and centroid fine-tuning.

The pipeline is prune (``workbench.prune``) -> :func:`share_weights` (per layer, the surviving
weights are clustered into ``2**bits`` shared values) -> :func:`finetune_centroids` (trained
quantization: each centroid moves by the sum of its members' gradients) -> ``workbench.coding.encode``
(cluster indices and relative positions of the non-zeros, each Huffman-coded into real bit streams)::

    codebooks = share_weights(model, bits=layer_bits(model, conv=8, fc=5))
    finetune_centroids(model, codebooks, data, epochs=3)
    enc = coding.encode(model, codebooks)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .data import Dataset
from .errors import WorkbenchError
from .prune import PRUNABLE, prunable_layers
from .train import History, fit

__all__ = [
    "INITS", "Codebook", "init_centroids", "kmeans_1d", "layer_bits", "share_weights", "codebook_layers",
    "centroid_grad", "tied", "finetune_centroids",
]

INITS = ("linear", "density", "random")
LLOYD_ITERS = 300


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


def codebook_layers(model: nn.Module, codebooks: Mapping[str, Codebook]) -> dict[str, nn.Module]:
    """The layers of `model` that `codebooks` belong to, by name, each checked against its codebook.

    Raises:
        WorkbenchError: a codebook names no Linear/Conv2d layer of the model, or its indices are not
            shaped like that layer's weight.
    """
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
    layers = codebook_layers(model, codebooks)
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

"""Pruning the GPT's Linear layers without retraining: magnitude, Wanda and SparseGPT, unstructured
(a fraction of each layer) or N:M semi-structured (2:4: two zeros in every four consecutive inputs).

* magnitude: score ``|W_ij|``, the smallest of the whole layer go (``workbench.prune``'s rule).
* Wanda (Sun et al. 2024): score ``|W_ij| * ||X_j||_2`` with ``X_j`` the j-th input channel over the
  calibration rows; compared within each output row (each row loses the same fraction).
* SparseGPT (Frantar & Alistarh 2023): column by column with the inverse Hessian of the inputs (as
  GPTQ), the pruned weights' error ``w_i / [H^-1]_ii`` is spread onto the columns not yet visited;
  the mask is chosen per block of 128 columns by ``w^2 / [H^-1]_ii^2`` (adaptive mask selection).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import WorkbenchError
from ..prune import _check_amount, _smallest_mask
from .calib import InputStats, block_linears, check_calibration, sequential
from .gpt import GPT

__all__ = ["METHODS", "magnitude_scores", "wanda_scores", "row_mask", "nm_mask", "sparsegpt", "sparsify",
           "check_nm"]

METHODS = ("magnitude", "wanda", "sparsegpt")


def check_nm(n: int, m: int, cols: int, name: str = "the layer") -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise WorkbenchError(f"an N:M pattern needs integers 0 < N < M, got {n}:{m}")
    if cols % m:
        raise WorkbenchError(f"{n}:{m} sparsity needs the input width of {name} ({cols}) to be a multiple of {m}")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs()


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``: a weight matters as much as it multiplies a large input."""
    return weight.detach().abs() * col_norm[None, :]


def row_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """1 = keep; in every row the ``round(amount * cols)`` lowest scores are 0 (Wanda's per-output comparison)."""
    k = round(amount * scores.shape[1])
    mask = torch.ones_like(scores)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, 0.0)
    return mask


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """1 = keep; in every group of `m` consecutive inputs of a row, the `n` lowest scores are 0."""
    rows, cols = scores.shape
    check_nm(n, m, cols)
    g = scores.reshape(rows, cols // m, m)
    mask = torch.ones_like(g)
    mask.scatter_(2, torch.topk(g, n, dim=2, largest=False).indices, 0.0)
    return mask.reshape(rows, cols)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, *, amount: float = 0.5, nm: tuple[int, int] | None = None,
              percdamp: float = 0.01, blocksize: int = 128) -> torch.Tensor:
    """SparseGPT: the pruned and reconstructed weight (zeros where pruned).

    Args:
        weight: (rows, cols). hessian: ``2 X X^T / n`` (cols, cols).
        amount: fraction to prune (unstructured; ignored when `nm` is given).
        nm: (N, M) for N zeros in every M consecutive inputs, e.g. (2, 4).
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if nm is not None:
        check_nm(*nm, cols)
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if nm is None:  # this block's mask: the lowest OBS saliencies w^2 / [H^-1]_ii^2
            pruned = _smallest_mask(W1 ** 2 / d[None, :] ** 2, amount) == 0
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                pruned.scatter_(1, i + torch.topk(sal, nm[0], dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def sparsify(model: GPT, *, method: str = "wanda", amount: float = 0.5, nm: tuple[int, int] | None = None,
             calib: torch.Tensor | None = None) -> GPT:
    """A pruned copy of `model`: every block Linear pruned by `method` at `amount` (or the N:M pattern `nm`).

    Wanda and SparseGPT need `calib` (token ids from the train split); blocks are pruned in order on
    the inputs of the already-pruned earlier blocks.

    Example:
        >>> pruned = sparsify(model, method="sparsegpt", nm=(2, 4), calib=calibration_ids(corpus))
    """
    if method not in METHODS:
        raise WorkbenchError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")
    if nm is None:
        _check_amount(amount, "a transformer layer")
    for name, layer in block_linears(model).items():
        if nm is not None:
            check_nm(*nm, layer.in_features, name)
    if method != "magnitude":
        if calib is None:
            raise WorkbenchError(f"{method} needs a calibration set: pass calib=calibration_ids(corpus)")
        check_calibration(calib)
    pruned = copy.deepcopy(model).eval()

    def apply(name: str, layer: nn.Linear, stats: InputStats | None) -> None:
        w = layer.weight
        if method == "sparsegpt":
            new = sparsegpt(w, stats.hessian, amount=amount, nm=nm)
        else:
            scores = magnitude_scores(w) if method == "magnitude" else wanda_scores(w, stats.col_norm)
            if nm is not None:
                mask = nm_mask(scores, *nm)
            elif method == "magnitude":
                mask = _smallest_mask(scores, amount)
            else:
                mask = row_mask(scores, amount)
            new = w.detach() * mask
        with torch.no_grad():
            layer.weight.copy_(new)

    if method == "magnitude":
        for name, layer in block_linears(pruned).items():
            apply(name, layer, None)
    else:
        sequential(pruned, calib, apply)
    return pruned

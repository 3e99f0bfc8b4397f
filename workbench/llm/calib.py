"""Calibration for the GPT's Linear layers: which layers, calibration windows, input statistics
(X^T X, |x| per channel, a sample of rows) and the exact folding of a per-input-channel scale into the
layer that produces the input (AWQ and SmoothQuant both rely on it).

Folding ``s`` into Linear ``y = W x`` means ``W' = W diag(s)`` and the producer emitting ``x / s``:
the LayerNorm before ``attn.qkv`` / ``mlp.fc`` (weight and bias divided by s), and the value rows
of ``attn.qkv`` before ``attn.proj`` (attention output is linear in v). ``mlp.proj`` follows a GELU,
which no scale passes through, so it has no producer and keeps s = 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import WorkbenchError
from ..quant import feed_inputs
from .corpus import Corpus
from .gpt import GPT

__all__ = ["block_linears", "calibration_ids", "InputStats", "collect_inputs", "sequential", "fold_scale", "with_outlier_channels",
           "can_fold", "check_calibration"]


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The Linear layers inside the transformer blocks, in order. The LM head is left out: it is tied
    to the token embedding (as in GPTQ/AWQ, embeddings and head stay in floating point)."""
    return {f"blocks.{i}.{n}": m for i, b in enumerate(model.blocks) for n, m in b.named_modules()
            if isinstance(m, nn.Linear)}


def check_calibration(calib: torch.Tensor) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.shape[0] == 0 or calib.shape[1] == 0:
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise WorkbenchError(f"the calibration set has no rows (got {shape}); pass token ids of shape "
                             "(sequences, length) with at least one sequence")
    return calib


def calibration_ids(corpus: Corpus, *, n_seqs: int = 32, block_size: int = 128, seed: int = 0) -> torch.Tensor:
    """`n_seqs` random windows of `block_size` characters from the *train* split (never the validation text)."""
    if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1:
        raise WorkbenchError(f"the calibration set has no rows: n_seqs must be a positive integer, got {n_seqs!r}")
    corpus.check_context(block_size)
    ids = corpus.ids("train")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - block_size, (n_seqs,), generator=gen)
    return ids[starts[:, None] + torch.arange(block_size)]


@dataclass
class InputStats:
    """What a Linear saw on the calibration set: ``xtx = sum x x^T`` (float64), row count, per-channel
    max |x| and mean |x|, and the first `rows` input rows (for output-error searches)."""

    xtx: torch.Tensor
    n: int
    absmax: torch.Tensor
    abssum: torch.Tensor
    rows: torch.Tensor

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2 X X^T / n`` of the layer-wise loss ||W X - Q X||^2 / n (float32)."""
        return (2.0 * self.xtx / self.n).float()

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / self.n).float()

    @property
    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel over all calibration rows (Wanda's activation norm)."""
        return self.xtx.diagonal().clamp(min=0).sqrt().float()


def collect_inputs(model: GPT, calib: torch.Tensor, names: list[str] | None = None, *, keep_rows: int = 2048,
                   batch_size: int = 16) -> dict[str, InputStats]:
    """Run `calib` through `model` and gather :class:`InputStats` at the input of each named Linear."""
    check_calibration(calib)
    layers = block_linears(model)
    names = list(layers) if names is None else names
    stats: dict[str, InputStats] = {}

    def gather(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        xd = x.double()
        s = stats.get(name)
        if s is None:
            d = x.shape[1]
            s = stats[name] = InputStats(torch.zeros(d, d, dtype=torch.float64), 0, torch.zeros(d), torch.zeros(d,
                                         dtype=torch.float64), x[:0].clone())
        s.xtx += xd.T @ xd
        s.n += x.shape[0]
        s.absmax = torch.maximum(s.absmax, x.abs().amax(0))
        s.abssum += xd.abs().sum(0)
        if len(s.rows) < keep_rows:
            s.rows = torch.cat([s.rows, x[:keep_rows - len(s.rows)]])

    feed_inputs(model, calib, {n: layers[n] for n in names}, gather, batch_size=batch_size)
    return stats


def sequential(model: GPT, calib: torch.Tensor, fn: Callable[[str, nn.Linear, InputStats], None], *,
               keep_rows: int = 0) -> None:
    """Block by block, collect the inputs of the block's Linears (earlier blocks already changed by `fn`,
    as in GPTQ/SparseGPT, so later layers calibrate on the inputs they will really see), then call
    ``fn(name, layer, stats)`` on each."""
    check_calibration(calib)
    layers = block_linears(model)
    for i in range(len(model.blocks)):
        names = [n for n in layers if n.startswith(f"blocks.{i}.")]
        stats = collect_inputs(model, calib, names, keep_rows=keep_rows)
        for n in names:
            fn(n, layers[n], stats[n])


def _producer(name: str) -> str | None:
    if name.endswith("attn.qkv"):
        return "ln_1"
    if name.endswith("mlp.fc"):
        return "ln_2"
    if name.endswith("attn.proj"):
        return "attn.qkv"
    return None


def can_fold(name: str) -> bool:
    """Whether a per-input-channel scale of Linear `name` folds exactly into its producer."""
    return _producer(name) is not None


@torch.no_grad()
def fold_scale(model: GPT, name: str, s: torch.Tensor) -> None:
    """In place: Linear `name`'s input becomes ``x / s`` (folded into its producer) and its weight ``W diag(s)``;
    the model's floating-point function is unchanged up to float32 rounding."""
    prod = _producer(name)
    if prod is None:
        raise WorkbenchError(f"{name} follows a nonlinearity: no layer to fold an input scale into")
    block = model.get_submodule(name.rsplit(".", 2)[0])
    layer = model.get_submodule(name)
    s = s.to(layer.weight.dtype)
    if (s <= 0).any() or not torch.isfinite(s).all():
        raise WorkbenchError(f"input scales for {name} must be positive and finite")
    if prod.startswith("ln"):
        ln = getattr(block, prod)
        ln.weight.div_(s)
        ln.bias.div_(s)
    else:
        qkv = block.attn.qkv
        d = block.attn.proj.in_features
        qkv.weight[2 * d:].div_(s[:, None])
        qkv.bias[2 * d:].div_(s)
    layer.weight.mul_(s[None, :])


def with_outlier_channels(model: GPT, *, channels: int = 4, factor: float = 20.0, seed: int = 0) -> GPT:
    """A copy of `model` computing the same function whose LayerNorm-fed Linears (``attn.qkv``, ``mlp.fc``)
    see `channels` input channels `factor` times larger, their weight columns `factor` times smaller.

    Large language models grow such outlier features by themselves (Dettmers et al. 2022); this small
    one does not, so the book makes them by an exact reparametrization (:func:`fold_scale` with
    ``s = 1 / factor``) to show which methods are fooled by it: a weight's magnitude changes, its
    product with the input's norm (Wanda's score) does not.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise WorkbenchError(f"channels must be a positive integer, got {channels!r}")
    if not factor > 0:
        raise WorkbenchError(f"factor must be positive, got {factor!r}")
    out = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, layer in block_linears(out).items():
        if not _producer(name) or not _producer(name).startswith("ln"):
            continue
        if channels > layer.in_features:
            raise WorkbenchError(f"channels {channels} exceeds {name}'s input width {layer.in_features}")
        s = torch.ones(layer.in_features)
        s[torch.randperm(layer.in_features, generator=gen)[:channels]] = 1.0 / factor
        fold_scale(out, name, s)
    return out

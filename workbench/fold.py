"""Batch-norm folding: merge an eval-mode BatchNorm into the Conv/Linear layer before it.

At inference BN is a fixed per-channel affine map, ``y = gamma (x - mean) / sqrt(var + eps) + beta``.
After a layer ``x = W u + b`` it folds into that layer (Jacob et al. 2018):

    W' = W * gamma / sqrt(var + eps)     (each output channel scaled)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

so the folded model computes the same function with one layer less per block; the weights the
quantizer then sees are the folded ones. ``torch.nn.utils.fusion.fuse_conv_bn_eval`` is the
reference the tests hold this against.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import WorkbenchError

__all__ = ["fold_weights", "fold_conv_bn", "fold_linear_bn", "fold_bn", "batchnorm_layers"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_weights(weight: torch.Tensor, bias: torch.Tensor | None, *, mean: torch.Tensor, var: torch.Tensor,
                 eps: float, gamma: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight, bias) of a layer with output channels on axis 0 followed by BN.

    Args:
        weight: (C_out, ...) weight of the Conv/Linear layer.
        bias: (C_out,) or None (a conv before BN usually has none).
        mean, var, eps: BN's running statistics and epsilon.
        gamma, beta: BN's affine parameters (None when ``affine=False``: 1 and 0).

    Returns:
        ``(W', b')`` with ``W' = W * gamma / sqrt(var + eps)`` per output channel and
        ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    Example:
        >>> w, b = fold_weights(conv.weight, conv.bias, mean=bn.running_mean, var=bn.running_var,
        ...                     eps=bn.eps, gamma=bn.weight, beta=bn.bias)
    """
    c = weight.shape[0]
    if mean.shape != (c,) or var.shape != (c,):
        raise WorkbenchError(f"BN statistics have {mean.numel()} channels but the layer has {c} output channels")
    gamma = torch.ones_like(mean) if gamma is None else gamma
    beta = torch.zeros_like(mean) if beta is None else beta
    bias = torch.zeros_like(mean) if bias is None else bias
    scale = gamma * torch.rsqrt(var + eps)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = (bias - mean) * scale + beta
    return w, b


def _check_bn(bn: _BatchNorm, channels: int) -> None:
    if not isinstance(bn, _BatchNorm):
        raise WorkbenchError(f"expected a BatchNorm layer, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise WorkbenchError("this BatchNorm has track_running_stats=False: it normalizes with the statistics of "
                             "each batch even at inference, so there is no fixed affine map to fold")
    if bn.num_features != channels:
        raise WorkbenchError(f"BatchNorm has {bn.num_features} features but the layer before it has {channels} "
                             "output channels")


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: _BatchNorm) -> nn.Module:
    """A new Conv layer (with bias) equal to ``bn(conv(x))`` in eval mode; the inputs are not modified.

    Example:
        >>> fused = fold_conv_bn(model.features[0], model.features[1])
    """
    if not isinstance(conv, _CONV):
        raise WorkbenchError(f"fold_conv_bn needs a Conv1d/2d/3d layer, got {type(conv).__name__}")
    _check_bn(bn, conv.out_channels)
    fused = copy.deepcopy(conv)
    w, b = fold_weights(conv.weight, conv.bias, mean=bn.running_mean, var=bn.running_var, eps=bn.eps,
                        gamma=bn.weight if bn.affine else None, beta=bn.bias if bn.affine else None)
    fused.weight = nn.Parameter(w.detach().clone(), conv.weight.requires_grad)
    fused.bias = nn.Parameter(b.detach().clone().to(w.dtype), conv.weight.requires_grad)
    return fused.eval()


@torch.no_grad()
def fold_linear_bn(linear: nn.Linear, bn: _BatchNorm) -> nn.Linear:
    """A new Linear layer (with bias) equal to ``bn(linear(x))`` in eval mode (BatchNorm1d over features)."""
    if not isinstance(linear, nn.Linear):
        raise WorkbenchError(f"fold_linear_bn needs an nn.Linear layer, got {type(linear).__name__}")
    _check_bn(bn, linear.out_features)
    fused = copy.deepcopy(linear)
    w, b = fold_weights(linear.weight, linear.bias, mean=bn.running_mean, var=bn.running_var, eps=bn.eps,
                        gamma=bn.weight if bn.affine else None, beta=bn.bias if bn.affine else None)
    fused.weight = nn.Parameter(w.detach().clone(), linear.weight.requires_grad)
    fused.bias = nn.Parameter(b.detach().clone().to(w.dtype), linear.weight.requires_grad)
    return fused.eval()


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules in `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _fold_sequential(seq: nn.Sequential) -> tuple[nn.Sequential, int]:
    out: list[nn.Module] = []
    folded = 0
    for module in seq:
        prev = out[-1] if out else None
        if isinstance(module, _BatchNorm) and isinstance(prev, _CONV):
            out[-1] = fold_conv_bn(prev, module)
            folded += 1
        elif isinstance(module, _BatchNorm) and isinstance(prev, nn.Linear):
            out[-1] = fold_linear_bn(prev, module)
            folded += 1
        else:
            out.append(module)
    return nn.Sequential(*out), folded


def _fold_children(module: nn.Module) -> int:
    folded = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential):
            new, n = _fold_sequential(child)
            folded += n
            folded += _fold_children(new)
            if n:
                setattr(module, name, new)
        else:
            folded += _fold_children(child)
    return folded


def fold_bn(model: nn.Module, *, inplace: bool = False, strict: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv or Linear layer inside an ``nn.Sequential``.

    The BN modules are removed from their Sequential (so the zoo's ``cnn`` with BN becomes exactly
    the shape of ``cnn`` without BN, with conv biases). The model is returned in eval mode.

    Args:
        model: the trained model (its BN running statistics are used, whatever its mode).
        inplace: modify `model` itself instead of a copy.
        strict: raise instead of warning when some BatchNorm could not be folded (one not
            preceded by a Conv/Linear in the same Sequential, e.g. in a custom ``forward``).

    Returns:
        The folded model.

    Example:
        >>> folded = fold_bn(model)
        >>> assert not batchnorm_layers(folded)
    """
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"fold_bn needs a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, nn.Sequential):
        # The root itself cannot be swapped in a parent: fold its children in place.
        new, _ = _fold_sequential(model)
        for key in list(model._modules):
            del model._modules[key]
        for i, m in enumerate(new):
            model.add_module(str(i), m)
    _fold_children(model)
    left = batchnorm_layers(model)
    if left:
        msg = (f"{len(left)} BatchNorm layer(s) could not be folded ({', '.join(left)}): fold_bn folds a BN that "
               "directly follows a Conv/Linear layer inside an nn.Sequential")
        if strict:
            raise WorkbenchError(msg)
        warnings.warn(msg, stacklevel=2)
    return model.eval()

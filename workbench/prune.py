"""Pruning: magnitude masks (layer-wise, global), Zhu & Gupta's gradual schedule, a sensitivity scan,
and structured channel/neuron pruning that rebuilds smaller layers.

Unstructured pruning zeroes individual weights; the tensors keep their shape, so the file and
the latency stay the same unless the zeros are stored sparsely (``sparse.sparse_sizes``).
Structured pruning removes whole output channels/neurons and rebuilds every layer that touches
them, so parameters, MACs and (on big enough models) latency really go down.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .data import Dataset
from .errors import WorkbenchError
from .train import History, evaluate, fit

__all__ = [
    "PRUNABLE", "prunable_layers", "magnitude_masks", "apply_masks", "enforce_masks", "finalize",
    "sparsity", "layer_sparsity", "fine_tune", "zhu_gupta_sparsity", "gradual_prune",
    "SensitivityScan", "sensitivity_scan", "amounts_from_scan",
    "l1_importance", "l2_importance", "channel_prune",
]

PRUNABLE = (nn.Linear, nn.Conv2d)
Amount = float | Mapping[str, float]


def _check_amount(amount: float, where: str) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise WorkbenchError(f"pruning amount {amount!r} for {where} must be a fraction in [0, 1) (0.8 = remove 80%)")
    return float(amount)


def prunable_layers(model: nn.Module, *, exclude: tuple[str, ...] = (), exclude_first: bool = False,
                    exclude_last: bool = False) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of `model` by qualified name, in definition order, minus exclusions."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    if not layers:
        raise WorkbenchError(f"{type(model).__name__} has no prunable layers (nn.Linear or nn.Conv2d)")
    unknown = sorted(set(exclude) - set(layers))
    if unknown:
        raise WorkbenchError(f"unknown layer(s) {', '.join(map(repr, unknown))} in exclude; prunable layers: {', '.join(layers)}")
    names = list(layers)
    drop = set(exclude) | ({names[0]} if exclude_first else set()) | ({names[-1]} if exclude_last else set())
    kept = {n: m for n, m in layers.items() if n not in drop}
    if not kept:
        raise WorkbenchError("every prunable layer is excluded: nothing left to prune")
    return kept


def _smallest_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    # Same rule as torch.nn.utils.prune.L1Unstructured: round(amount * n) smallest |w| go, ties by topk.
    mask = torch.ones_like(scores)
    k = round(amount * scores.numel())
    if k:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = 0
    return mask


def magnitude_masks(model: nn.Module, amount: Amount, *, scope: str = "layer", exclude: tuple[str, ...] = (),
                    exclude_first: bool = False, exclude_last: bool = False) -> dict[str, torch.Tensor]:
    """Masks (1 keep, 0 prune) that remove the weights of smallest magnitude.

    Args:
        model: any module with Linear/Conv2d layers (only their ``weight`` is pruned).
        amount: fraction in [0, 1) to remove, one for all layers or ``{layer name: fraction}``
            (layers not named are left dense; layer scope only).
        scope: "layer" removes `amount` of each layer; "global" removes `amount` of all the
            weights together, so layers with many small weights lose more.
        exclude, exclude_first, exclude_last: layers to leave dense.

    Returns:
        ``{layer name: mask}`` with masks shaped like the weights.

    Example:
        >>> masks = magnitude_masks(model, 0.8, scope="global", exclude_last=True)
    """
    layers = prunable_layers(model, exclude=exclude, exclude_first=exclude_first, exclude_last=exclude_last)
    if scope not in ("layer", "global"):
        raise WorkbenchError(f"unknown pruning scope {scope!r}; expected 'layer' or 'global'")
    if isinstance(amount, Mapping):
        unknown = sorted(set(amount) - set(layers))
        if unknown:
            raise WorkbenchError(f"unknown layer name(s) {', '.join(unknown)} in the amounts; "
                                 f"prunable layers: {', '.join(layers)}")
        if scope != "layer":
            raise WorkbenchError("per-layer amounts need scope='layer' (global scope takes one amount)")
        amounts = {n: _check_amount(amount.get(n, 0.0), n) for n in layers}
    else:
        amounts = {n: _check_amount(amount, "all layers") for n in layers}
    with torch.no_grad():
        if scope == "layer":
            return {n: _smallest_mask(m.weight.abs(), amounts[n]) for n, m in layers.items()}
        flat = torch.cat([m.weight.abs().reshape(-1) for m in layers.values()])
        masks = _smallest_mask(flat, amounts[next(iter(layers))]).split([m.weight.numel() for m in layers.values()])
        return {n: mk.view_as(m.weight) for (n, m), mk in zip(layers.items(), masks)}


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked weights and keep each mask on its layer (buffer ``weight_mask``) for fine-tuning."""
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        if mask.shape != layer.weight.shape:
            raise WorkbenchError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(layer.weight.shape)}")
        if hasattr(layer, "weight_mask"):
            layer.weight_mask = mask.to(layer.weight.dtype).clone()
        else:
            layer.register_buffer("weight_mask", mask.to(layer.weight.dtype).clone())
    enforce_masks(model)


def enforce_masks(model: nn.Module) -> None:
    """Re-apply every layer's mask: call after each optimizer step so pruned weights stay exactly 0.

    (An optimizer with momentum, or Adam, would otherwise move them away from zero.)
    """
    with torch.no_grad():
        for layer in model.modules():
            mask = getattr(layer, "weight_mask", None)
            if isinstance(layer, PRUNABLE) and mask is not None:
                layer.weight.mul_(mask)


def finalize(model: nn.Module) -> nn.Module:
    """Apply and then remove the masks: plain layers whose pruned weights are zeros."""
    enforce_masks(model)
    for layer in model.modules():
        if "weight_mask" in getattr(layer, "_buffers", {}):
            del layer._buffers["weight_mask"]
    return model


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights in each Linear/Conv2d layer."""
    return {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def sparsity(model: nn.Module, *, exclude: tuple[str, ...] = ()) -> float:
    """Fraction of exactly-zero weights over the Linear/Conv2d layers (minus `exclude`) together."""
    if not any(isinstance(m, PRUNABLE) for m in model.modules()):
        return 0.0
    weights = [m.weight for m in prunable_layers(model, exclude=exclude).values()]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def fine_tune(model: nn.Module, data: Dataset, *, epochs: int, **fit_kwargs) -> History | None:
    """`fit` with the masks enforced after every step (pruned weights stay zero). 0 epochs: no-op."""
    if epochs == 0:
        return None
    return fit(model, data, epochs=epochs, on_step=enforce_masks, **fit_kwargs)


def zhu_gupta_sparsity(step: int, *, final: float, initial: float = 0.0, begin: int = 0, steps: int,
                       interval: int = 1) -> float:
    """Zhu & Gupta (2017) cubic schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

    Sparsity rises fast while many redundant weights remain and slowly as it nears `final`.
    Before `begin` it is `initial`; after ``begin + steps * interval`` it is `final`.

    Example:
        >>> [round(zhu_gupta_sparsity(t, final=0.9, steps=4), 3) for t in range(5)]
        [0.0, 0.52, 0.788, 0.886, 0.9]
    """
    if steps < 1 or interval < 1:
        raise WorkbenchError(f"the schedule needs steps >= 1 and interval >= 1, got steps={steps}, interval={interval}")
    _check_amount(final, "the final sparsity")
    progress = min(max((step - begin) / (steps * interval), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def gradual_prune(model: nn.Module, data: Dataset, *, final: float, steps: int, epochs_per_step: int = 1,
                  scope: str = "global", exclude: tuple[str, ...] = (), **fit_kwargs) -> list[dict[str, float]]:
    """Prune to `final` sparsity in `steps` rounds of the cubic schedule, fine-tuning after each.

    With ``steps=1`` this is one-shot pruning followed by fine-tuning. The model keeps its masks
    (call :func:`finalize` to drop them).

    Returns:
        One row per round: step, target sparsity, measured sparsity, validation accuracy.
    """
    rows = []
    for step in range(1, steps + 1):
        target = zhu_gupta_sparsity(step, final=final, steps=steps)
        apply_masks(model, magnitude_masks(model, target, scope=scope, exclude=exclude))
        fine_tune(model, data, epochs=epochs_per_step, **fit_kwargs)
        rows.append({"step": step, "target": target,
                     "sparsity": sparsity(model, exclude=exclude),
                     "val_acc": evaluate(model, data.X_val, data.y_val).accuracy})
    return rows


@dataclass(frozen=True)
class SensitivityScan:
    """Accuracy (on `split`) when each layer alone is magnitude-pruned by each amount."""

    amounts: tuple[float, ...]
    accuracy: dict[str, tuple[float, ...]]
    base_accuracy: float
    split: str

    def rows(self) -> list[dict[str, float | str]]:
        """One row per layer, one column per amount (for a table)."""
        return [{"layer": n, **{f"{a:.0%}": acc for a, acc in zip(self.amounts, accs)}}
                for n, accs in self.accuracy.items()]


def sensitivity_scan(model: nn.Module, data: Dataset, *, amounts: tuple[float, ...] = (
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95), split: str = "val") -> SensitivityScan:
    """Prune one layer at a time (no fine-tuning) and record the accuracy; the model is left as it was.

    Example:
        >>> scan = sensitivity_scan(model, data); amounts = amounts_from_scan(scan, max_drop=0.01)
    """
    amounts = tuple(_check_amount(a, "the scan") for a in amounts)
    X, y = data.split(split)
    base = evaluate(model, X, y).accuracy
    result = {}
    for name, layer in prunable_layers(model).items():
        original = layer.weight.detach().clone()
        accs = []
        for a in amounts:
            with torch.no_grad():
                layer.weight.mul_(_smallest_mask(original.abs(), a))
            accs.append(evaluate(model, X, y).accuracy)
            with torch.no_grad():
                layer.weight.copy_(original)
        result[name] = tuple(accs)
    return SensitivityScan(amounts=amounts, accuracy=result, base_accuracy=base, split=split)


def amounts_from_scan(scan: SensitivityScan, *, max_drop: float = 0.01) -> dict[str, float]:
    """Per layer, the largest scanned amount whose accuracy stays within `max_drop` of the unpruned model."""
    out = {}
    for name, accs in scan.accuracy.items():
        ok = [a for a, acc in zip(scan.amounts, accs) if scan.base_accuracy - acc <= max_drop]
        out[name] = max(ok, default=0.0)
    return out


# ----------------------------------------------------------------------------------------------
# Structured pruning


def l1_importance(weight: torch.Tensor) -> torch.Tensor:
    """Li et al. (2017) filter importance: the L1 norm of each output channel's weights."""
    return weight.detach().abs().reshape(weight.shape[0], -1).sum(1)


def l2_importance(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output channel's weights."""
    return weight.detach().reshape(weight.shape[0], -1).norm(dim=1)


_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                 nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu}


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> list[torch.fx.Node]:
    """The model's nodes in execution order, with shapes; refuses anything but a simple chain."""
    name = type(model).__name__
    try:
        gm = torch.fx.symbolic_trace(model)
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise WorkbenchError(f"structured pruning could not trace {name} with torch.fx "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    for node in nodes:
        inputs = [a for a in node.all_input_nodes]
        ok = len(inputs) == 1 and len(node.users) == 1
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            ok = ok and (isinstance(mod, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten) + _PASS_MODULES)
                         or (isinstance(mod, nn.Conv2d) and mod.groups == 1))
        elif node.op == "call_function":
            ok = ok and (node.target in _PASS_FUNCTIONS or node.target is torch.flatten)
        elif node.op == "call_method":
            ok = ok and node.target in ("relu", "flatten")
        else:
            ok = False
        if not ok:
            raise WorkbenchError(
                f"structured pruning handles chains of Conv2d/Linear layers joined by BatchNorm, activations, "
                f"pooling, dropout and flatten; {name} has '{node.format_node()}', which it cannot see through "
                "(branches, attention and grouped convolutions are not supported)")
    return nodes


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _slice_layer(layer: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Module:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if in_idx is not None:
        w = w[:, in_idx]
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, bias=b is not None, padding_mode=layer.padding_mode)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _slice_bn(bn: nn.Module, idx: torch.Tensor) -> nn.Module:
    new = type(bn)(len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[idx])
            new.bias.copy_(bn.bias[idx])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[idx])
            new.running_var.copy_(bn.running_var[idx])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def channel_prune(model: nn.Module, amount: Amount, *, input_shape: tuple[int, ...],
                  importance: Callable[[torch.Tensor], torch.Tensor] = l1_importance,
                  exclude: tuple[str, ...] = ()) -> nn.Module:
    """A smaller copy of `model` with the least important output channels/neurons removed.

    Every Conv2d/Linear but the last (its outputs are the classes) loses `amount` of its output
    channels, ranked by `importance` (any callable: weight -> one score per output channel). The
    BatchNorm after it, the next layer's input channels and, across a flatten, the matching
    block of the next Linear's inputs are cut to match, so the result is a plain dense model.

    Args:
        model: a chain of Conv2d/Linear layers (mlp, lenet300, lenet5, cnn in the zoo).
        amount: fraction in [0, 1) of channels to remove, or ``{layer name: fraction}``.
        input_shape: shape of one example (to trace shapes through the flatten).
        importance: channel scores; :func:`l1_importance` (Li et al. 2017) by default.
        exclude: layers whose output channels are kept.

    Example:
        >>> small = channel_prune(model, 0.5, input_shape=data.input_shape)
    """
    was_training = model.training
    nodes = _trace(model.eval(), input_shape)
    model.train(was_training)
    layers = [n.target for n in nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), PRUNABLE)]
    if not layers:
        raise WorkbenchError(f"{type(model).__name__} has no prunable layers (nn.Linear or nn.Conv2d)")
    prunable = layers[:-1]
    unknown = sorted((set(amount) if isinstance(amount, Mapping) else set()) | set(exclude))
    unknown = [n for n in unknown if n not in prunable]
    if unknown:
        raise WorkbenchError(f"unknown or unprunable layer name(s) {', '.join(unknown)}; layers whose channels can "
                             f"be pruned: {', '.join(prunable)} (the last layer's outputs are the classes)")
    amounts = {n: 0.0 if n in exclude else _check_amount(amount.get(n, 0.0) if isinstance(amount, Mapping)
                                                          else amount, n) for n in prunable}
    pruned = copy.deepcopy(model)
    keep_out: torch.Tensor | None = None  # channels kept by the last producer, mapped to the current tensor
    for node in nodes:
        if node.op != "call_module":
            if node.target is torch.flatten or node.target == "flatten":
                keep_out = _through_flatten(node, keep_out)
            continue
        layer = pruned.get_submodule(node.target)
        if isinstance(layer, PRUNABLE):
            out_idx = None
            if node.target in amounts:
                n_out = layer.weight.shape[0]
                n_keep = n_out - round(amounts[node.target] * n_out)
                if n_keep < 1:
                    raise WorkbenchError(f"pruning {amounts[node.target]:.0%} of the {n_out} channels of "
                                         f"{node.target} would remove all of them; use a smaller amount")
                scores = importance(layer.weight)
                if scores.shape != (n_out,):
                    raise WorkbenchError(f"importance must return one score per output channel ({n_out}) of "
                                         f"{node.target}, got shape {tuple(scores.shape)}")
                out_idx = torch.topk(scores, n_keep).indices.sort().values
            _replace(pruned, node.target, _slice_layer(layer, out_idx, keep_out))
            keep_out = out_idx
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and keep_out is not None:
            _replace(pruned, node.target, _slice_bn(layer, keep_out))
        elif isinstance(layer, nn.Flatten):
            keep_out = _through_flatten(node, keep_out)
    return pruned.train(was_training)


def _through_flatten(node: torch.fx.Node, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Channel c of a (C, H, W) tensor becomes features c*H*W ... c*H*W + H*W - 1 after flattening."""
    if keep is None:
        return None
    shape = node.all_input_nodes[0].meta["tensor_meta"].shape
    per_channel = math.prod(shape[2:])
    return (keep[:, None] * per_channel + torch.arange(per_channel)).reshape(-1)

"""Gradient compression as DDP communication hooks (fp16, PowerSGD, top-k with error feedback), with byte counts.

DDP hands each bucket of gradients (one flat tensor) to a *communication hook*, which must
return a future of the averaged bucket. The default hook all-reduces it; the hooks here send
less:

- ``fp16``: torch's ``fp16_compress_hook``: cast to half precision, all-reduce, cast back (2x fewer bytes);
- ``powersgd``: torch's ``powerSGD_hook`` (Vogels et al. 2019): each gradient matrix M (n x m)
  is approximated by P Q^T of rank r from one step of power iteration; P (n x r) and Q (m x r)
  are all-reduced instead of M, and the part of M the approximation missed is kept locally and
  added to the next step's gradient (error feedback);
- ``topk`` (written here, after Deep Gradient Compression, Lin et al. 2018): each rank sends only
  the k largest-magnitude entries of (gradient + residual) as (value, index) pairs and keeps the
  rest as its residual (error feedback), so nothing is lost, only delayed.

To count the bytes a hook really communicates, :class:`count_collectives` wraps
``torch.distributed.all_reduce`` / ``all_gather`` (which the hooks call) for the duration of
training and records every tensor sent on DDP's process group.
"""

# No `from __future__ import annotations` here: DDP checks a hook's annotations at runtime
# (the bucket must be annotated dist.GradBucket itself, not the string "dist.GradBucket").
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from workbench.errors import WorkbenchError

__all__ = ["HOOKS", "CommStats", "count_collectives", "counted", "TopKState", "topk_hook", "topk_compress",
           "error_feedback_step", "topk_decompress", "make_hook"]

HOOKS = ("allreduce", "fp16", "powersgd", "topk")


@dataclass
class CommStats:
    """Bytes a DDP run communicated, per rank.

    ``bucket_bytes`` is what plain all-reduce would have handed to the network (the gradient
    buckets); ``payload_bytes`` is what the hook actually handed to collectives; ``sent_bytes``
    is what this rank puts on the wire with the bandwidth-optimal algorithms: an all-reduce of S
    bytes sends 2(p-1)/p x S (ring: reduce-scatter then all-gather), an all-gather of S bytes
    per rank sends (p-1) x S.
    """

    world_size: int = 1
    hook_calls: int = 0
    collectives: int = 0
    bucket_bytes: int = 0
    payload_bytes: int = 0
    sent_bytes: float = 0.0
    per_op: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int) -> None:
        p = self.world_size
        self.collectives += 1
        self.payload_bytes += nbytes
        self.per_op[op] = self.per_op.get(op, 0) + nbytes
        self.sent_bytes += nbytes * (2 * (p - 1) / p if op == "all_reduce" else (p - 1))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class count_collectives:
    """While active, count the bytes of every all-reduce and all-gather issued on `group` into `stats`.

    The hooks (torch's and ours) call ``dist.all_reduce(tensor, group=..., async_op=True)``,
    sometimes from callbacks that run after the hook returned; wrapping the module functions for
    the whole run catches all of them. Collectives on other groups (e.g. metrics) are not counted.

    Example:
        >>> with count_collectives(group, stats):  # doctest: +SKIP
        ...     train()
    """

    _OPS = ("all_reduce", "all_gather")

    def __init__(self, group: dist.ProcessGroup, stats: CommStats):
        self.group, self.stats = group, stats
        self._saved: dict[str, Callable] = {}

    def _wrap(self, op: str, fn: Callable) -> Callable:
        def counting(tensor_or_list, *args, group=None, **kwargs):
            if group is self.group:
                # all_gather(output_list, input): the input is what this rank sends.
                sent = args[0] if op == "all_gather" else tensor_or_list
                self.stats.add(op, _nbytes(sent))
            return fn(tensor_or_list, *args, group=group, **kwargs)

        return counting

    def __enter__(self) -> "count_collectives":
        for op in self._OPS:
            self._saved[op] = getattr(dist, op)
            setattr(dist, op, self._wrap(op, self._saved[op]))
        return self

    def __exit__(self, *exc: object) -> None:
        for op, fn in self._saved.items():
            setattr(dist, op, fn)


def counted(hook: Callable, stats: CommStats) -> Callable:
    """Wrap a communication hook so each call adds its bucket's size to ``stats.bucket_bytes``."""

    def wrapped(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        stats.hook_calls += 1
        stats.bucket_bytes += _nbytes(bucket.buffer())
        return hook(state, bucket)

    wrapped.__name__ = f"counted_{getattr(hook, '__name__', 'hook')}"
    return wrapped


# --- top-k sparsification with error feedback: the tensor math ---------------------------------------


def topk_compress(tensor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` entries of the flat `tensor` with the largest magnitude: (values, int32 indices).

    Example:
        >>> topk_compress(torch.tensor([0.1, -3.0, 2.0, 0.5]), 2)
        (tensor([-3.,  2.]), tensor([1, 2], dtype=torch.int32))
    """
    if tensor.dim() != 1:
        raise WorkbenchError(f"topk_compress expects a flat (1-D) tensor, got shape {tuple(tensor.shape)}")
    k = min(int(k), tensor.numel())
    if k < 1:
        raise WorkbenchError(f"k must be >= 1 (at least one entry sent), got {k}")
    idx = tensor.abs().topk(k, sorted=False).indices.sort().values
    # int32 indices: half the bytes of int64, and enough for buckets below 2**31 entries.
    return tensor[idx], idx.to(torch.int32)


def topk_decompress(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """A dense flat tensor of `numel` zeros with `values` added at `indices` (repeated indices add up)."""
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    return out.index_add_(0, indices.long(), values)


def error_feedback_step(grad: torch.Tensor, residual: torch.Tensor, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of top-k with error feedback: send the top k of ``grad + residual``, keep the rest.

    Returns ``(values, indices, new_residual)`` with
    ``topk_decompress(values, indices) + new_residual == grad + residual`` exactly, so over many
    steps ``sum(sent) + residual == sum(grad)``: every gradient entry is eventually applied.

    Example:
        >>> v, i, r = error_feedback_step(torch.tensor([1.0, -4.0, 2.0]), torch.zeros(3), 1)
        >>> v, r
        (tensor([-4.]), tensor([1., 0., 2.]))
    """
    acc = grad + residual
    values, indices = topk_compress(acc, k)
    new_residual = acc.clone()
    new_residual[indices.long()] = 0.0
    return values, indices, new_residual


@dataclass
class TopKState:
    """State of :func:`topk_hook`: the process group, the fraction of entries sent, each bucket's residual."""

    process_group: dist.ProcessGroup | None
    ratio: float = 0.01
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise WorkbenchError(f"top-k ratio must be in (0, 1] (the fraction of gradient entries sent), "
                                 f"got {self.ratio}")


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-gather every rank's top-k (value, index) pairs and average them.

    Example:
        >>> ddp_model.register_comm_hook(TopKState(None, ratio=0.01), topk_hook)  # doctest: +SKIP
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    n = buffer.numel()
    k = max(1, round(state.ratio * n))
    residual = state.residuals.get(bucket.index())
    if residual is None or residual.numel() != n:
        residual = torch.zeros_like(buffer)
    values, indices, state.residuals[bucket.index()] = error_feedback_step(buffer, residual, k)
    # Every rank sends the same k, so all-gather (fixed sizes) works; the union of indices differs per rank.
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    futures = [dist.all_gather(all_values, values, group=group, async_op=True).get_future(),
               dist.all_gather(all_indices, indices, group=group, async_op=True).get_future()]

    def decompress(_: torch.futures.Future) -> torch.Tensor:
        dense = topk_decompress(torch.cat(all_values), torch.cat(all_indices), n)
        return buffer.copy_(dense.div_(world))

    return torch.futures.collect_all(futures).then(decompress)


def make_hook(name: str, group: dist.ProcessGroup, *, powersgd_rank: int = 2, powersgd_start_iter: int = 10,
              topk_ratio: float = 0.01, seed: int = 0) -> tuple[Any, Callable]:
    """``(state, hook)`` for ``DDP.register_comm_hook``: one of ``HOOKS``.

    Args:
        name: "allreduce" (torch's default behaviour, as a hook so that it is counted the same way),
            "fp16", "powersgd" or "topk".
        group: DDP's process group.
        powersgd_rank: rank r of PowerSGD's approximation.
        powersgd_start_iter: steps of plain all-reduce before PowerSGD starts (its warm-up).
        topk_ratio: fraction of entries top-k sends.
        seed: PowerSGD's random initial Q.

    Example:
        >>> state, hook = make_hook("powersgd", dist.group.WORLD, powersgd_rank=4)  # doctest: +SKIP
    """
    if name == "allreduce":
        return group, default_hooks.allreduce_hook
    if name == "fp16":
        return group, default_hooks.fp16_compress_hook
    if name == "powersgd":
        if powersgd_rank < 1:
            raise WorkbenchError(f"powersgd_rank must be >= 1, got {powersgd_rank}")
        # Error feedback and warm start need start_powerSGD_iter >= 2 (torch checks it).
        state = powersgd.PowerSGDState(process_group=group, matrix_approximation_rank=powersgd_rank,
                                       start_powerSGD_iter=max(2, powersgd_start_iter), min_compression_rate=2,
                                       use_error_feedback=True, warm_start=True, random_seed=seed)
        return state, powersgd.powerSGD_hook
    if name == "topk":
        return TopKState(group, ratio=topk_ratio), topk_hook
    raise WorkbenchError(f"unknown communication hook {name!r}; known: {', '.join(HOOKS)}")

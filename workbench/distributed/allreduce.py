"""Ring all-reduce by hand over point-to-point send/recv: reduce-scatter, then all-gather; bytes counted.

Run (checks it against ``dist.all_reduce`` and times both)::

    torchrun --standalone --nproc_per_node=2 -m workbench.distributed.allreduce --sizes 1000,1000003

The p ranks form a ring (rank r sends to r+1 and receives from r-1) and the tensor is cut into
p chunks. **Reduce-scatter**: in step s = 0..p-2, rank r sends chunk (r - s) mod p and adds the
chunk (r - s - 1) mod p it receives to its own; after p-1 steps rank r holds the complete sum
of chunk (r + 1) mod p. **All-gather**: p-1 more steps pass the completed chunks around the
ring. Each rank sends 2(p-1) chunks of N/p elements: 2(p-1)/p x N in all, independent of p
(Patarasuk & Yuan 2009 show this is the least any all-reduce must send), which is why the ring
is the workhorse of data-parallel training.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError

from . import worker

__all__ = ["RingStats", "ring_schedule", "ring_all_reduce", "simulate_ring", "expected_bytes", "check", "main"]


@dataclass
class RingStats:
    """Bytes and messages this rank sent and received in ring all-reduces."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    messages: int = 0


def expected_bytes(numel: int, element_size: int, world_size: int) -> float:
    """What each rank sends in a ring all-reduce of `numel` elements: 2(p-1)/p x the tensor's bytes.

    Example:
        >>> expected_bytes(1000, 4, 4)
        6000.0
    """
    p = world_size
    return 2 * (p - 1) / p * numel * element_size


def ring_schedule(rank: int, world_size: int) -> list[tuple[str, int, int]]:
    """The 2(p-1) steps of rank `rank`: ("reduce" | "gather", chunk sent to the right, chunk received from the left).

    Example:
        >>> ring_schedule(0, 3)
        [('reduce', 0, 2), ('reduce', 2, 1), ('gather', 1, 0), ('gather', 0, 2)]
    """
    p, r = world_size, rank
    steps = [("reduce", (r - s) % p, (r - s - 1) % p) for s in range(p - 1)]
    return steps + [("gather", (r + 1 - s) % p, (r - s) % p) for s in range(p - 1)]


def simulate_ring(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run :func:`ring_schedule` for len(tensors) ranks in one process (message passing by hand).

    Every rank's result equals ``sum(tensors)``: a check of the schedule without any network.

    Example:
        >>> simulate_ring([torch.ones(5), 2 * torch.ones(5), 3 * torch.ones(5)])[1]
        tensor([6., 6., 6., 6., 6.])
    """
    p = len(tensors)
    bufs = [t.detach().clone().reshape(-1) for t in tensors]
    chunks = [b.tensor_split(p) for b in bufs]
    plans = [ring_schedule(r, p) for r in range(p)]
    for step in range(2 * (p - 1)):
        # All ranks send at once: take the messages before anyone changes a chunk.
        messages = [chunks[r][plans[r][step][1]].clone() for r in range(p)]
        for r in range(p):
            kind, _, recv_idx = plans[r][step]
            incoming = messages[(r - 1) % p]
            if kind == "reduce":
                chunks[r][recv_idx].add_(incoming)
            else:
                chunks[r][recv_idx].copy_(incoming)
    return [b.view_as(t) for b, t in zip(bufs, tensors)]


def ring_all_reduce(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                    stats: RingStats | None = None) -> torch.Tensor:
    """Sum `tensor` over all ranks in place with a ring of send/recv; the same result as ``dist.all_reduce``.

    Args:
        tensor: contiguous; replaced by the sum over ranks.
        group: the process group (default: all ranks).
        stats: if given, counts the bytes this rank sends and receives.

    Returns:
        `tensor`.

    Example:
        >>> ring_all_reduce(torch.ones(4))  # doctest: +SKIP  (under torchrun, 2 ranks)
        tensor([2., 2., 2., 2.])
    """
    if not tensor.is_contiguous():
        raise WorkbenchError("ring_all_reduce works in place on a contiguous tensor; pass tensor.contiguous()")
    p = dist.get_world_size(group)
    r = dist.get_rank(group)
    right, left = (r + 1) % p, (r - 1) % p
    if group is not None:  # send/recv take global ranks
        right, left = dist.get_global_rank(group, right), dist.get_global_rank(group, left)
    chunks = tensor.view(-1).tensor_split(p)  # views: updates land in `tensor`
    for step, (kind, send_idx, recv_idx) in enumerate(ring_schedule(r, p)):
        out_chunk, in_chunk = chunks[send_idx], chunks[recv_idx]
        # isend first, then recv: every rank sends to its right while receiving from its left, so a
        # blocking send on all ranks at once could wait forever on full socket buffers. A chunk is
        # empty when the tensor has fewer elements than there are ranks; the rank on the other end
        # computes the same sizes, so both skip that message.
        send = dist.isend(out_chunk, dst=right, group=group, tag=step) if out_chunk.numel() else None
        if in_chunk.numel():
            incoming = torch.empty_like(in_chunk)
            dist.recv(incoming, src=left, group=group, tag=step)
            if kind == "reduce":
                in_chunk.add_(incoming)
            else:
                in_chunk.copy_(incoming)
        if send is not None:
            send.wait()  # before the next step may change out_chunk
        if stats is not None:
            stats.sent_bytes += out_chunk.numel() * out_chunk.element_size()
            stats.recv_bytes += in_chunk.numel() * in_chunk.element_size()
            stats.messages += int(out_chunk.numel() > 0)
    return tensor


def check(sizes: Sequence[int], w: worker.Worker, *, repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """For each size: the ring against ``dist.all_reduce`` (max error), bytes sent vs 2(p-1)/p, timings."""
    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(seed * 1000 + w.rank)
        x = torch.randn(n, generator=gen)
        ref = x.clone()
        dist.all_reduce(ref)
        stats = RingStats()
        mine = ring_all_reduce(x.clone(), stats=stats)
        ring_t, gloo_t = [], []
        for _ in range(repeats):
            y = x.clone()
            dist.barrier()
            t0 = time.perf_counter()
            ring_all_reduce(y)
            ring_t.append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(y)
            gloo_t.append(time.perf_counter() - t0)
        expected = expected_bytes(n, x.element_size(), w.world_size)
        rows.append({"numel": n, "bytes": n * x.element_size(), "max_abs_err": float((mine - ref).abs().max()),
                     "sent_bytes": stats.sent_bytes, "recv_bytes": stats.recv_bytes, "messages": stats.messages,
                     "expected_sent_bytes": expected,
                     "bytes_ratio": stats.sent_bytes / expected if expected else 1.0,
                     "ring_ms": 1e3 * statistics.median(ring_t), "torch_ms": 1e3 * statistics.median(gloo_t)})
        worker.log(w, f"numel {n}: max err {rows[-1]['max_abs_err']:.2e}, sent {stats.sent_bytes} B "
                      f"(2(p-1)/p x size = {expected:.0f} B), ring {rows[-1]['ring_ms']:.2f} ms, "
                      f"dist.all_reduce {rows[-1]['torch_ms']:.2f} ms")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """The torchrun entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m workbench.distributed.allreduce",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,7,1000,1000003", help="comma-separated tensor sizes (elements)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="results: <stem>.rank<r>.json per rank")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise WorkbenchError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if any(s < 1 for s in sizes) or args.repeats < 1:
        raise WorkbenchError(f"sizes and repeats must be >= 1, got sizes={sizes}, repeats={args.repeats}")
    w = worker.init(threads=1, what="workbench.distributed.allreduce")
    worker.write_result(w, {"sizes": check(sizes, w, repeats=args.repeats, seed=args.seed)}, args.json)


if __name__ == "__main__":
    worker.run_main(main)

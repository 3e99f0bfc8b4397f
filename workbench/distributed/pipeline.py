"""Pipeline (model) parallelism from scratch: an MLP cut into stages, one per rank, micro-batched (GPipe, 1F1B).

Run (2 stages, 8 micro-batches, both schedules, each step timed)::

    torchrun --standalone --nproc_per_node=2 -m workbench.distributed.pipeline --micro-batches 8 --json pipe.json

Stage r holds only its layers. In the forward pass it receives the activations of micro-batch j
from stage r-1 (``dist.recv``), runs its layers and sends the result to stage r+1
(``dist.isend``); in the backward pass it receives d(loss)/d(its output) from stage r+1, runs
autograd through its layers and sends d(loss)/d(its input) back to stage r-1. The loss of
micro-batch j is its summed cross-entropy divided by the *whole* batch size, so the gradients
accumulated over the m micro-batches are exactly those of the mean loss over the whole batch:
the same as single-process training (each rank checks its stage against the full model).

Schedules: **GPipe** runs all m forwards, then all m backwards; **1F1B** starts the backward of
a micro-batch as soon as possible (after p-1-r warm-up forwards on stage r), so a stage holds at
most p-r micro-batches' activations instead of m. With equal stages both leave each stage idle
for a fraction (p-1)/(m+p-1) of the step (the *bubble*: filling and draining the pipeline);
each rank measures its own idle time with a clock.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workbench.data import load
from workbench.errors import WorkbenchError
from workbench.models import build

from . import worker

__all__ = ["PipeConfig", "SCHEDULES", "schedule", "bubble_formula", "build_full", "split_stages", "batch",
           "reference_grads", "run_step", "run", "main"]

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PipeConfig:
    """The model (an MLP of `depth` hidden layers of width `hidden`), the batch and the micro-batching.

    Sizeable layers on purpose: the stages' compute must dominate the messages for the bubble
    (idle time) to be measurable against the formula.
    """

    hidden: int = 1024
    depth: int = 5
    batch_size: int = 2048
    micro_batches: int = 8
    seed: int = 0
    repeats: int = 7

    def __post_init__(self) -> None:
        for name in ("hidden", "depth", "batch_size", "micro_batches", "repeats"):
            if int(getattr(self, name)) < 1:
                raise WorkbenchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batches:
            raise WorkbenchError(f"batch_size ({self.batch_size}) must be a multiple of micro_batches "
                                 f"({self.micro_batches}) so that every micro-batch has the same size")

    def to_args(self) -> list[str]:
        """These settings as flags of ``python -m workbench.distributed.pipeline`` (for :func:`launch`)."""
        return ["--hidden", str(self.hidden), "--depth", str(self.depth), "--batch-size", str(self.batch_size),
                "--micro-batches", str(self.micro_batches), "--seed", str(self.seed), "--repeats", str(self.repeats)]


def bubble_formula(stages: int, micro_batches: int) -> float:
    """Idle share of each stage in a GPipe/1F1B step with equal stages: (p-1)/(m+p-1).

    Example:
        >>> round(bubble_formula(2, 8), 4)
        0.1111
    """
    return (stages - 1) / (micro_batches + stages - 1)


def schedule(kind: str, rank: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The order of ("F", j) forwards and ("B", j) backwards that stage `rank` runs.

    Example:
        >>> schedule("1f1b", 0, 2, 3)
        [('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('B', 2)]
    """
    m = micro_batches
    if kind == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    if kind == "1f1b":
        warmup = min(stages - rank - 1, m)
        ops = [("F", j) for j in range(warmup)]
        for j in range(m - warmup):
            ops += [("F", warmup + j), ("B", j)]
        return ops + [("B", j) for j in range(m - warmup, m)]
    raise WorkbenchError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")


def build_full(cfg: PipeConfig) -> nn.Module:
    """The whole model as one process would train it (the zoo's MLP on 8x8 digits)."""
    return build("mlp", input_shape=(1, 8, 8), num_classes=10, seed=cfg.seed, hidden=(cfg.hidden,) * cfg.depth)


def split_stages(model: nn.Module, stages: int) -> list[list[tuple[str, nn.Module]]]:
    """Cut the MLP's layer list into `stages` consecutive parts with about equal weights (so equal work).

    Each part is a list of (name in the full model, module); a Linear keeps its ReLU with it.
    """
    blocks: list[list[tuple[str, nn.Module]]] = []
    for name, module in model.net.named_children():
        if isinstance(module, nn.Linear) or not blocks:
            blocks.append([])
        blocks[-1].append((f"net.{name}", module))
    if stages > len(blocks):
        raise WorkbenchError(f"cannot cut a model of {len(blocks)} layers into {stages} stages; use more layers "
                             f"(--depth) or fewer processes")
    weights = [sum(p.numel() for _, m in b for p in m.parameters()) for b in blocks]
    total, parts, acc = sum(weights), [[]], 0
    for i, (b, wgt) in enumerate(zip(blocks, weights)):
        left = len(blocks) - i  # blocks not placed yet, including this one
        # Close the current stage when it holds its share, keeping one block for each later stage.
        if parts[-1] and len(parts) < stages and (acc >= total * len(parts) / stages or left == stages - len(parts)):
            parts.append([])
        parts[-1].extend(b)
        acc += wgt
    return parts


def batch(cfg: PipeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch_size` training digits (repeated if needed) and their labels."""
    data = load("digits", seed=cfg.seed)
    reps = -(-cfg.batch_size // len(data.y_train))
    return data.X_train.repeat(reps, 1, 1, 1)[:cfg.batch_size], data.y_train.repeat(reps)[:cfg.batch_size]


def reference_grads(cfg: PipeConfig, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Single-process gradients of the mean cross-entropy over the whole batch, by parameter name."""
    model = build_full(cfg).train()
    F.cross_entropy(model(X), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run_step(stage: nn.Sequential, kind: str, w: worker.Worker, X: torch.Tensor, y: torch.Tensor,
             cfg: PipeConfig, shapes: tuple[tuple[int, ...], tuple[int, ...]], lookahead: int = 2) -> dict[str, Any]:
    """One forward+backward of the whole batch through the pipeline; this rank's timings.

    Args:
        shapes: the shape of one example at this stage's input and at its output.
        lookahead: receives are posted this many operations ahead. gloo sends a message once the
            receiver has asked for it; asking early lets the sender push the data the moment it
            is computed, instead of when its communication thread next gets the CPU.

    Returns:
        Busy seconds (compute), the step's wall time on this rank, the peak number of
        micro-batches whose activations were held at once, and the timeline of compute intervals.
    """
    r, p, m = w.rank, w.world_size, cfg.micro_batches
    first, last = r == 0, r == p - 1
    xs, ys = X.chunk(m), y.chunk(m)
    ops = schedule(kind, r, p, m)

    def post(k: int) -> tuple[torch.Tensor, dist.Work] | None:
        op, j = ops[k]
        if op == "F" and not first:  # the activations of micro-batch j, from the stage before
            buf = torch.empty((len(xs[j]), *shapes[0]))
            return buf, dist.irecv(buf, src=r - 1, tag=j)
        if op == "B" and not last:  # d(loss)/d(our output) for micro-batch j, from the stage after
            buf = torch.empty((len(xs[j]), *shapes[1]))
            return buf, dist.irecv(buf, src=r + 1, tag=m + j)
        return None

    posted: dict[int, tuple[torch.Tensor, dist.Work] | None] = {}
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    sends: list[dist.Work] = []
    busy, peak, timeline = 0.0, 0, []
    dist.barrier()  # everyone starts the clock together
    t0 = time.perf_counter()
    for k, (op, j) in enumerate(ops):
        for ahead in range(k, min(k + lookahead + 1, len(ops))):
            if ahead not in posted:
                posted[ahead] = post(ahead)
        incoming = posted.pop(k)
        if incoming is not None:
            incoming[1].wait()  # waiting here is idle time
        t = time.perf_counter()
        if op == "F":
            x = xs[j] if first else incoming[0].requires_grad_()
            out = stage(x)
            if last:
                # Summed over the micro-batch, divided by the whole batch: the m losses add up to the mean.
                out = F.cross_entropy(out, ys[j], reduction="sum") / len(y)
            else:
                sends.append(dist.isend(out.detach(), dst=r + 1, tag=j))
            saved[j] = (x, out)
            peak = max(peak, len(saved))
        else:
            x, out = saved.pop(j)
            if last:
                out.backward()
            else:
                out.backward(incoming[0])
            if not first:
                sends.append(dist.isend(x.grad, dst=r - 1, tag=m + j))
        now = time.perf_counter()
        busy += now - t
        timeline.append((op, j, t - t0, now - t0))
    for s in sends:
        s.wait()
    return {"busy_s": busy, "wall_s": time.perf_counter() - t0, "peak_in_flight": peak, "timeline": timeline}


def _stage(cfg: PipeConfig, w: worker.Worker
           ) -> tuple[nn.Sequential, dict[str, str], tuple[tuple[int, ...], tuple[int, ...]]]:
    full = build_full(cfg).train()
    parts = split_stages(full, w.world_size)
    mine = parts[w.rank]
    names = {}  # stage parameter name -> full-model parameter name
    for i, (full_name, module) in enumerate(mine):
        for pname, _ in module.named_parameters():
            names[f"{i}.{pname}"] = f"{full_name}.{pname}"
    # This stage's input and output shapes: run the stages up to ours on one example.
    shapes = []
    with torch.no_grad():
        h = torch.zeros(1, 1, 8, 8)
        for part in parts[:w.rank + 1]:
            shapes.append(tuple(h.shape[1:]))
            for _, module in part:
                h = module(h)
    return nn.Sequential(*(m for _, m in mine)), names, (shapes[-1], tuple(h.shape[1:]))


def run(cfg: PipeConfig, w: worker.Worker, save_grads: str | None = None) -> dict[str, Any]:
    """Both schedules, `cfg.repeats` steps each; gradients checked against the full model every step."""
    X, y = batch(cfg)
    stage, names, shapes = _stage(cfg, w)
    ref = reference_grads(cfg, X, y)
    out: dict[str, Any] = {"config": asdict(cfg), "stages": w.world_size,
                           "stage_params": sum(p.numel() for p in stage.parameters()),
                           "bubble_formula": bubble_formula(w.world_size, cfg.micro_batches)}
    max_diff = 0.0
    for kind in SCHEDULES:
        steps = []
        for _ in range(cfg.repeats + 1):  # the first step warms up allocators and sockets: not counted
            stage.zero_grad(set_to_none=True)
            steps.append(run_step(stage, kind, w, X, y, cfg, shapes))
            grads = {names[n]: prm.grad for n, prm in stage.named_parameters()}
            max_diff = max(max_diff, max(float((g - ref[n]).abs().max()) for n, g in grads.items()))
        steps = steps[1:]
        # A step ends when its last stage is done: the makespan is the slowest rank's wall time.
        # Each rank's bubble is its idle share of the makespan; the step's bubble is their mean.
        walls = torch.tensor([s["wall_s"] for s in steps], dtype=torch.float64)
        dist.all_reduce(walls, op=dist.ReduceOp.MAX)
        busy = torch.tensor([s["busy_s"] for s in steps], dtype=torch.float64)
        mean_busy = busy.clone()
        dist.all_reduce(mean_busy)
        mean_busy /= w.world_size
        step_bubbles = (1 - mean_busy / walls).tolist()
        out[kind] = {"bubble_measured": statistics.median(step_bubbles), "step_bubbles": step_bubbles,
                     "rank_bubble": statistics.median((1 - busy / walls).tolist()),
                     "busy_s": statistics.median(busy.tolist()), "makespan_s": statistics.median(walls.tolist()),
                     "peak_in_flight": max(s["peak_in_flight"] for s in steps),
                     "timeline": steps[len(steps) // 2]["timeline"]}
        res = out[kind]
        worker.log(w, f"{kind}: bubble {res['bubble_measured']:.3f} (this rank {res['rank_bubble']:.3f}; formula "
                      f"{out['bubble_formula']:.3f}), step {res['makespan_s'] * 1e3:.1f} ms, "
                      f"peak {res['peak_in_flight']} micro-batches in flight")
    out["max_grad_diff"] = max_diff
    if save_grads:
        path = Path(save_grads) / f"stage{w.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({names[n]: prm.grad for n, prm in stage.named_parameters()}, path)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """The torchrun entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m workbench.distributed.pipeline",
                                     description=__doc__.splitlines()[0])
    d = PipeConfig()
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--depth", type=int, default=d.depth, help="hidden layers of the whole MLP")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--micro-batches", type=int, default=d.micro_batches)
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per schedule")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--stages", type=int, default=None, help="expected number of stages (= processes)")
    parser.add_argument("--save-grads", default=None, help="folder for each stage's gradients (stage<r>.pt)")
    parser.add_argument("--json", default=None, help="results: <stem>.rank<r>.json per rank")
    args = parser.parse_args(argv)
    cfg = PipeConfig(hidden=args.hidden, depth=args.depth, batch_size=args.batch_size,
                     micro_batches=args.micro_batches, seed=args.seed, repeats=args.repeats)
    w = worker.init(threads=1, expected_world_size=args.stages, what=f"a pipeline of {args.stages} stages")
    if w.world_size < 2:
        raise WorkbenchError("pipeline parallelism needs at least 2 processes (one per stage); launch with "
                             "--nproc_per_node=2 or more")
    worker.write_result(w, run(cfg, w, args.save_grads), args.json)


if __name__ == "__main__":
    worker.run_main(main)

"""Data parallelism with DistributedDataParallel: every rank trains a replica on its shard; gradients are averaged.

One machine, two processes (``--batch-size`` is per rank, so the global batch is 2 x 32)::

    torchrun --standalone --nproc_per_node=2 -m workbench.distributed.ddp \\
        --model mlp --dataset digits --epochs 5 --out ckpt.pt --json results.json

writes ``ckpt.pt`` (rank 0 only: the replicas are identical) and ``results.rank0.json``,
``results.rank1.json``. Several machines: run the same command on every node, adding the node
count and a rendezvous point that all of them reach (node 0's address)::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=node0.example:29400 \\
        --rdzv_id=job42 -m workbench.distributed.ddp --epochs 5 --out ckpt.pt

(c10d rendezvous numbers the nodes itself; with the static rendezvous give each node
``--node_rank=<0..nnodes-1> --master_addr=node0.example --master_port=29500`` instead.) The
backend follows the device: NCCL on GPUs, gloo on CPUs.

Why it equals single-process training: rank r computes g_r, the gradient of the mean loss over
its local batch; DDP all-reduces and divides by the world size p, so every replica applies
(1/p) sum_r g_r. With equal local batches (``DistributedSampler`` pads the data so that every
rank gets as many examples), that is exactly the gradient of the mean loss over the union of
the p batches; :func:`train_single` replays those unions in one process. ``--hook`` takes one
communication hook or a comma-separated list (each trained in turn from the same start).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from workbench.data import Dataset, load
from workbench.errors import WorkbenchError
from workbench.models import build, save_checkpoint
from workbench.train import evaluate

from . import compress, worker

__all__ = ["DDPConfig", "initial_model", "train", "train_single", "shard_batches", "model_spec", "add_arguments",
           "configs", "main"]


@dataclass(frozen=True)
class DDPConfig:
    """Settings of one data-parallel run (``batch_size`` is per rank; the global batch is p times larger)."""

    model: str = "mlp"
    dataset: str = "digits"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    hidden: tuple[int, ...] | None = None
    hook: str = "allreduce"
    powersgd_rank: int = 2
    topk_ratio: float = 0.01

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise WorkbenchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise WorkbenchError(f"need lr > 0 and 0 <= momentum < 1, got lr={self.lr}, momentum={self.momentum}")
        if self.max_steps is not None and self.max_steps < 1:
            raise WorkbenchError(f"max_steps must be >= 1 (or None for whole epochs), got {self.max_steps}")
        if self.hook not in compress.HOOKS:
            raise WorkbenchError(f"unknown hook {self.hook!r}; known: {', '.join(compress.HOOKS)}")

    def to_args(self, hooks: Sequence[str] | None = None) -> list[str]:
        """These settings as command-line flags of ``python -m workbench.distributed.ddp`` (for :func:`launch`).

        Example:
            >>> DDPConfig(epochs=2).to_args()[:4]
            ['--model', 'mlp', '--dataset', 'digits']
        """
        args = ["--model", self.model, "--dataset", self.dataset, "--epochs", str(self.epochs),
                "--batch-size", str(self.batch_size), "--lr", repr(self.lr), "--momentum", repr(self.momentum),
                "--seed", str(self.seed), "--hook", ",".join(hooks or [self.hook]),
                "--powersgd-rank", str(self.powersgd_rank), "--topk-ratio", repr(self.topk_ratio)]
        if self.max_steps is not None:
            args += ["--max-steps", str(self.max_steps)]
        if self.hidden:
            args += ["--hidden", ",".join(str(h) for h in self.hidden)]
        return args


def model_spec(cfg: DDPConfig, data: Dataset) -> dict[str, Any]:
    """The :func:`workbench.models.build` arguments of the run's model (for checkpoints)."""
    options = {"hidden": tuple(cfg.hidden)} if cfg.hidden else {}
    return {"name": cfg.model, "input_shape": data.input_shape, "num_classes": data.num_classes, "options": options}


def initial_model(cfg: DDPConfig, data: Dataset) -> nn.Module:
    """The model every rank starts from (seeded by ``cfg.seed``), in train mode."""
    spec = model_spec(cfg, data)
    # Same seed on every rank, so the replicas start equal (DDP also broadcasts rank 0's weights).
    return build(spec["name"], input_shape=spec["input_shape"], num_classes=spec["num_classes"], seed=cfg.seed,
                 **spec["options"]).train()


def _sampler(data: Dataset, cfg: DDPConfig, world_size: int, rank: int) -> DistributedSampler:
    ds = TensorDataset(data.X_train, data.y_train)
    return DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)


def shard_batches(data: Dataset, cfg: DDPConfig, world_size: int, rank: int, epoch: int) -> list[torch.Tensor]:
    """Index batches that rank `rank` of `world_size` sees in `epoch` (what its DataLoader yields).

    Example:
        >>> [len(b) for b in shard_batches(load("digits"), DDPConfig(batch_size=32), 2, 0, 0)][:2]
        [32, 32]
    """
    sampler = _sampler(data, cfg, world_size, rank)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(iter(sampler)))
    return list(order.split(cfg.batch_size))


def _steps(cfg: DDPConfig, epoch_batches: int) -> Iterator[tuple[int, int]]:
    step = 0
    for epoch in range(cfg.epochs):
        for b in range(epoch_batches):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                return
            yield epoch, b
            step += 1


def train_single(cfg: DDPConfig, world_size: int, data: Dataset | None = None, *, threads: int = 1) -> nn.Module:
    """The single-process equivalent of `cfg` on `world_size` ranks: the same steps on the union of their batches.

    Uses the mean loss over the combined batch, which is what DDP's averaged gradient is the gradient of.

    Args:
        threads: torch threads while training (restored afterwards). One, like each rank: these
            small models train fastest on one thread, and on a busy machine a second thread that
            is not scheduled stalls every operation.

    Example:
        >>> ref = train_single(DDPConfig(epochs=1, max_steps=10), world_size=2)
    """
    data = data or load(cfg.dataset, seed=cfg.seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = initial_model(cfg, data)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        per_epoch: dict[int, list[torch.Tensor]] = {}
        n_batches = len(shard_batches(data, cfg, world_size, 0, 0))
        for epoch, b in _steps(cfg, n_batches):
            if epoch not in per_epoch:
                shards = [shard_batches(data, cfg, world_size, r, epoch) for r in range(world_size)]
                per_epoch = {epoch: [torch.cat([s[i] for s in shards]) for i in range(n_batches)]}
            idx = per_epoch[epoch][b]
            loss = F.cross_entropy(model(data.X_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(previous)
    return model.eval()


def train(cfg: DDPConfig, w: worker.Worker, data: Dataset | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train `cfg` with DDP on this rank (call on every rank after :func:`worker.init`).

    Returns:
        The trained replica (the plain module) and this rank's results: per-epoch train loss
        (averaged over ranks), validation and test accuracy, seconds, and the bytes communicated.
    """
    data = data or load(cfg.dataset, seed=cfg.seed)
    model = initial_model(cfg, data).to(w.device)
    # A group of its own for gradient traffic, so that only the hook's bytes are counted; made by
    # worker.new_group so that it times out like the default group (not after gloo's 30 minutes).
    group = worker.new_group(w)
    ddp = DDP(model, process_group=group, device_ids=[w.device.index] if w.device.type == "cuda" else None)
    stats = compress.CommStats(world_size=w.world_size)
    state, hook = compress.make_hook(cfg.hook, group, powersgd_rank=cfg.powersgd_rank, topk_ratio=cfg.topk_ratio,
                                     seed=cfg.seed)
    ddp.register_comm_hook(state, compress.counted(hook, stats))
    sampler = _sampler(data, cfg, w.world_size, w.rank)
    # Whole batches by one fancy index (the same batches as batch_size=..., without 32 single-example
    # fetches and a collate per step, which would cost more than the digits MLP's step itself).
    loader = DataLoader(sampler.dataset, sampler=BatchSampler(sampler, cfg.batch_size, drop_last=False),
                        batch_size=None)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    epochs: list[dict[str, float]] = []
    step, seconds, examples = 0, 0.0, 0
    with compress.count_collectives(group, stats):
        for epoch in range(cfg.epochs):
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            t0 = time.perf_counter()
            total = torch.zeros(2, dtype=torch.float64)
            for X, y in loader:
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                X, y = X.to(w.device), y.to(w.device)
                loss = F.cross_entropy(ddp(X), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # the hook runs here, bucket by bucket, overlapping the backward pass
                opt.step()
                total += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
                step += 1
            dt = time.perf_counter() - t0
            seconds += dt
            dist.all_reduce(total)  # default group: metrics are not gradient traffic
            examples += int(total[1])
            val = evaluate(model, data.X_val.to(w.device), data.y_val.to(w.device))
            test = evaluate(model, data.X_test.to(w.device), data.y_test.to(w.device))
            epochs.append({"epoch": epoch + 1, "steps": step, "train_loss": float(total[0] / total[1]),
                           "val_acc": val.accuracy, "test_acc": test.accuracy, "seconds": dt,
                           "sent_bytes": stats.sent_bytes})
            worker.log(w, f"{cfg.hook} epoch {epoch + 1}/{cfg.epochs}: loss {epochs[-1]['train_loss']:.4f}, "
                          f"val acc {val.accuracy:.4f}, {dt:.2f} s, {stats.sent_bytes / 1e6:.2f} MB sent")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    # Drop the DDP wrapper (its reducer holds the group and the hook's state) before the group goes.
    del ddp, opt, state, hook
    gc.collect()
    dist.destroy_process_group(group)
    result = {"config": asdict(cfg), "epochs": epochs, "steps": step, "train_seconds": seconds,
              "examples_per_s": examples / max(seconds, 1e-9),
              "final_val_acc": epochs[-1]["val_acc"], "final_test_acc": epochs[-1]["test_acc"],
              "comm": stats.to_dict(), "threads": w.threads}
    return model.eval(), result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The DDPConfig options as command-line flags."""
    d = DDPConfig()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--dataset", default=d.dataset)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--momentum", type=float, default=d.momentum)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--hidden", default=None, help="MLP hidden sizes, e.g. 256,128")
    parser.add_argument("--hook", default=d.hook,
                        help=f"communication hook(s), comma-separated, from: {', '.join(compress.HOOKS)}")
    parser.add_argument("--powersgd-rank", type=int, default=d.powersgd_rank)
    parser.add_argument("--topk-ratio", type=float, default=d.topk_ratio)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=None, help="checkpoint written by rank 0")
    parser.add_argument("--json", default=None, help="results: <stem>.rank<r>.json per rank")


def configs(args: argparse.Namespace) -> list[DDPConfig]:
    """One DDPConfig per hook named in ``--hook``."""
    hidden = tuple(int(h) for h in args.hidden.split(",")) if args.hidden else None
    return [DDPConfig(model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, momentum=args.momentum, seed=args.seed, max_steps=args.max_steps, hidden=hidden,
                      hook=h.strip(), powersgd_rank=args.powersgd_rank, topk_ratio=args.topk_ratio)
            for h in args.hook.split(",")]


def main(argv: Sequence[str] | None = None) -> None:
    """The torchrun entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m workbench.distributed.ddp", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfgs = configs(args)  # bad settings fail here, before joining the group
    w = worker.init(threads=args.threads, what="workbench.distributed.ddp")
    data = load(cfgs[0].dataset, seed=cfgs[0].seed)
    runs = {}
    for cfg in cfgs:
        model, runs[cfg.hook] = train(cfg, w, data)
        if args.out and w.rank == 0:  # the replicas are identical: one copy is enough
            out = Path(args.out)
            path = out if len(cfgs) == 1 else out.with_name(f"{out.stem}.{cfg.hook}{out.suffix}")
            save_checkpoint(path, model, spec=model_spec(cfg, data),
                            metadata={"dataset": cfg.dataset, "ddp": asdict(cfg), "world_size": w.world_size,
                                      "test_acc": runs[cfg.hook]["final_test_acc"]})
            runs[cfg.hook]["checkpoint"] = str(path)
    worker.write_result(w, {"runs": runs}, args.json)


if __name__ == "__main__":
    worker.run_main(main)

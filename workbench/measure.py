"""Measuring a model: parameters, non-zeros, MACs, size on disk, and latency statistics.

Sparse storage formats (CSR, bitmask, relative indices) are in :mod:`workbench.sparse`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import WorkbenchError

__all__ = [
    "latency_stats",
    "torch_threads",
    "count_params",
    "count_nonzero",
    "MacsReport",
    "macs",
    "param_bytes",
    "state_dict_bytes",
    "file_bytes",
    "LatencyStats",
    "time_calls",
    "latency",
    "torch_latency",
    "side_by_side",
]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero (what pruning reduces)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@dataclass(frozen=True)
class MacsReport:
    """Multiply-accumulates for one forward pass of one example, in total and per module."""

    total: int
    per_module: dict[str, int]


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> MacsReport:
    """Count MACs of one forward pass of a single example of shape `input_shape` (no batch axis).

    The count comes from torch's own FLOP counter (``torch.utils.flop_counter``), which sees every
    matrix product, convolution and attention matmul; one MAC is two FLOPs. Element-wise work
    (ReLU, BN, softmax, adds) is not counted, as is the convention in papers.

    Example:
        >>> macs(nn.Linear(784, 300), (784,)).total
        235200
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(x)
    except Exception as exc:
        raise WorkbenchError(
            f"could not run the model on an input of shape {tuple(x.shape)} to count MACs: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    per_module = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        per_module[name] = sum(int(v) for v in ops.values()) // 2
    return MacsReport(total=counter.get_total_flops() // 2, per_module=per_module)


def param_bytes(model: nn.Module) -> int:
    """Raw bytes of all parameter and buffer tensors (what the weights occupy in memory)."""
    tensors = list(model.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors)


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict(), "model.pt")``: the file you would ship.

    Written to a real file because the zip archive inside records the file's name, so the
    size depends (slightly) on it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file on disk (an ONNX model, a checkpoint)."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"cannot measure {str(p)!r}: no such file")
    return p.stat().st_size


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call in microseconds, over `repeats` timed calls after `warmup` untimed ones."""

    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    std_us: float
    min_us: float
    max_us: float
    repeats: int
    warmup: int
    threads: int
    batch_size: int

    @property
    def per_example_us(self) -> float:
        """Median time per example: p50 divided by the batch size."""
        return self.p50_us / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyStats":
        return cls(**d)


def time_calls(fn: Callable[[], Any], *, warmup: int = 10, repeats: int = 100) -> np.ndarray:
    """Call `fn` `warmup` times untimed, then `repeats` times timed; return each call's microseconds."""
    if repeats < 1 or warmup < 0:
        raise WorkbenchError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times[i] = (time.perf_counter_ns() - t0) / 1e3
    return times


def latency(fn: Callable[[], Any], *, warmup: int = 10, repeats: int = 100, threads: int = 1,
            batch_size: int = 1) -> LatencyStats:
    """Latency percentiles of `fn` (which must already run with `threads` threads; this records it).

    Percentiles, not the mean, because latency distributions have long tails (a p99 is what the
    slowest 1% of users see). Warm-up calls are discarded: the first calls pay for lazy
    initialization, memory allocation and cold caches.
    """
    return latency_stats(time_calls(fn, warmup=warmup, repeats=repeats), warmup=warmup, threads=threads,
                  batch_size=batch_size)


def latency_stats(t: np.ndarray, *, warmup: int, threads: int, batch_size: int) -> LatencyStats:
    """Summarize per-call times in microseconds `t` (warm-up calls already dropped): p50/p90/p99 by
    linear interpolation (numpy's default), mean, and the setting they were measured under."""
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return LatencyStats(
        p50_us=float(p50), p90_us=float(p90), p99_us=float(p99), mean_us=float(t.mean()),
        std_us=float(t.std()), min_us=float(t.min()), max_us=float(t.max()),
        repeats=len(t), warmup=warmup, threads=threads, batch_size=batch_size,
    )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to `n` inside the block, and put back afterwards (whatever happens).

    Example:
        >>> with torch_threads(1): model(x)
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_latency(model: nn.Module, x: torch.Tensor, *, threads: int = 1, warmup: int = 10,
                  repeats: int = 100) -> LatencyStats:
    """Latency of eager PyTorch inference (eval mode, no autograd) on batch `x`, with `threads` threads.

    Example:
        >>> torch_latency(model, data.X_test[:1], threads=1).p50_us
    """
    if threads < 1:
        raise WorkbenchError(f"threads must be >= 1, got {threads}")
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), torch.inference_mode():
            return latency(lambda: model(x), warmup=warmup, repeats=repeats, threads=threads, batch_size=len(x))
    finally:
        model.train(was_training)


def side_by_side(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 5, repeats: int = 50, warmup: int = 10,
                 threads: int = 1, batch_size: int = 1) -> dict[str, LatencyStats]:
    """Latency of several callables measured in interleaved rounds, for fair ratios.

    On a shared machine the load drifts; timing A fully and then B fully lets that drift land on
    one of them. Here each round times every callable in turn, and each one's statistics pool its
    samples over all rounds. Each callable must already use `threads` threads (recorded only).

    Example:
        >>> stats = side_by_side({"dense": lambda: dense(x), "pruned": lambda: small(x)}, batch_size=len(x))
        >>> stats["dense"].p50_us / stats["pruned"].p50_us
    """
    if not fns:
        raise WorkbenchError("side_by_side needs at least one callable to time")
    samples: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_calls(fn, warmup=0, repeats=repeats))
    return {name: latency_stats(np.concatenate(chunks), warmup=warmup, threads=threads, batch_size=batch_size)
            for name, chunks in samples.items()}

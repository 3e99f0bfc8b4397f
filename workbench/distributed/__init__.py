"""Distributed training on torch.distributed: data parallel (DDP), pipeline parallel, ring all-reduce, compression.

The entry points run under torchrun (``python -m workbench.distributed.ddp``, ``.pipeline``,
``.allreduce``); :func:`launch` starts them from Python and collects each rank's results.
Import the modules themselves (``from workbench.distributed import ddp``): this package does
not import them, so that ``python -m workbench.distributed.ddp`` runs each module exactly once.
"""

from __future__ import annotations

from .launch import LaunchError, RankFailure, launch

__all__ = ["launch", "LaunchError", "RankFailure", "allreduce", "bench", "compress", "ddp", "pipeline", "worker"]

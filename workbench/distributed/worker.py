"""What every rank does: join the process group (backend by device, timeouts), log, report results and errors.

The entry points (``ddp``, ``pipeline``, ``allreduce``, ``compress``) run under torchrun, which
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for each
process. :func:`launch.launch` adds three variables of its own:

- ``WORKBENCH_DIST_RESULTS``: a folder where rank ``r`` writes ``rank{r}.json`` (its results)
  or ``rank{r}.error.json`` (the exception that killed it), which the launcher collects, and
  ``rank{r}.fault.txt`` (the Python stacks at a fatal signal: SIGABRT, SIGSEGV, ... from native code);
- ``WORKBENCH_DIST_TIMEOUT_S``: the timeout of every collective, so a rank whose peer is gone
  fails instead of waiting forever (groups beyond the default one must be made with
  :func:`new_group`, which passes it on: ``dist.new_group`` alone gives gloo's 30 minutes);
- ``WORKBENCH_LAUNCH_ID``: a tag the launcher uses to find (and kill) any process left behind.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError

__all__ = ["Worker", "backend_for", "init", "new_group", "log", "write_result", "run_main", "RESULTS_ENV",
           "TIMEOUT_ENV", "LAUNCH_ID_ENV"]

RESULTS_ENV = "WORKBENCH_DIST_RESULTS"
TIMEOUT_ENV = "WORKBENCH_DIST_TIMEOUT_S"
LAUNCH_ID_ENV = "WORKBENCH_LAUNCH_ID"
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Worker:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    threads: int
    timeout_s: float = DEFAULT_TIMEOUT_S  # of every collective, in every group


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA GPUs, gloo for CPUs.

    NCCL only moves GPU memory; gloo moves CPU tensors (and is the one that works everywhere).

    Example:
        >>> backend_for("cpu")
        'gloo'
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(*, threads: int = 1, timeout_s: float | None = None, expected_world_size: int | None = None,
         what: str = "this program") -> Worker:
    """Join the process group that torchrun set up; pick the backend by device; time out every collective.

    Args:
        threads: torch intra-op threads for this rank (1: ranks on one machine share its cores).
        timeout_s: seconds any collective may wait for a peer; default ``$WORKBENCH_DIST_TIMEOUT_S`` or 60.
        expected_world_size: if given, the number of processes `what` needs.
        what: named in the error when the world size is wrong.

    Returns:
        The :class:`Worker` (rank, world size, backend, device).

    Raises:
        WorkbenchError: not started by torchrun, or the wrong number of processes.

    Example:
        >>> w = init()  # doctest: +SKIP  (under torchrun)
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise WorkbenchError(
            f"{what} must run under torchrun (missing {', '.join(missing)} in the environment); start it with "
            f"`torchrun --standalone --nproc_per_node=2 -m <module> ...` or workbench.distributed.launch()"
        )
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if expected_world_size is not None and world_size != expected_world_size:
        raise WorkbenchError(
            f"{what} needs exactly {expected_world_size} processes but was launched with {world_size} "
            f"(WORLD_SIZE={world_size}); launch it with --nproc_per_node={expected_world_size} "
            f"(nprocs={expected_world_size}) or change its settings to match"
        )
    if threads < 1:
        raise WorkbenchError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    timeout = _timeout(timeout_s)
    # The timeout bounds every collective and point-to-point wait: a rank whose peer died raises
    # after at most this long instead of hanging the whole job.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    worker = Worker(rank, world_size, local_rank, backend, device, threads, timeout)
    log(worker, f"pid {os.getpid()}, {backend} on {device}, {threads} thread(s), world size {world_size}")
    return worker


def _timeout(timeout_s: float | None) -> float:
    raw = timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        timeout = float(raw)
    except (TypeError, ValueError):
        timeout = float("nan")
    if not timeout > 0:
        raise WorkbenchError(f"the collective timeout must be a positive number of seconds "
                             f"(timeout_s or ${TIMEOUT_ENV}), got {raw!r}")
    return timeout


def new_group(worker: Worker, ranks: list[int] | None = None) -> Any:
    """A process group over `ranks` (default: all) whose collectives time out like the default group's.

    ``dist.new_group`` without a timeout falls back to the backend's default (30 minutes for gloo),
    so a stopped or hung peer would hold a job in that group far past ``$WORKBENCH_DIST_TIMEOUT_S``.

    Example:
        >>> group = new_group(w)  # doctest: +SKIP  (under torchrun, after init)
    """
    ranks = list(range(worker.world_size)) if ranks is None else list(ranks)
    return dist.new_group(ranks, timeout=datetime.timedelta(seconds=worker.timeout_s))


def log(worker: Worker | int, message: str) -> None:
    """Print one progress line prefixed with the rank (the launcher streams these lines)."""
    rank = worker.rank if isinstance(worker, Worker) else int(worker)
    # One write with the newline: the ranks share torchrun's pipe, and print() writes the text and
    # the newline separately, so two ranks' lines could run together.
    sys.stdout.write(f"[rank {rank}] {message}\n")
    sys.stdout.flush()


def _rank_file(path: str | os.PathLike, rank: int) -> Path:
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.json'}")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # the launcher never reads half a file


def write_result(worker: Worker, result: dict[str, Any], json_path: str | os.PathLike | None = None) -> None:
    """Write this rank's results to ``$WORKBENCH_DIST_RESULTS/rank{r}.json`` and, if given, ``<stem>.rank{r}.json``.

    Example:
        >>> write_result(w, {"loss": 0.1}, "results.json")  # doctest: +SKIP  (writes results.rank0.json, ...)
    """
    payload = {"rank": worker.rank, "world_size": worker.world_size, "backend": worker.backend,
               "master_port": int(os.environ.get("MASTER_PORT", 0)), **result}
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        _write_json(Path(folder) / f"rank{worker.rank}.json", payload)
    if json_path:
        _write_json(_rank_file(json_path, worker.rank), payload)


def run_main(main: Callable[[], None]) -> None:
    """Run an entry point; on an exception, leave ``rank{r}.error.json`` for the launcher, then re-raise.

    The launcher reads the file to say *which* rank failed and *why* (torchrun alone reports
    only exit codes). The process group is always destroyed, so no rank exits holding sockets.
    """
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        # A crash in native code (gloo, torch) kills the process with a signal and no Python
        # exception; faulthandler still writes every thread's Python stack, for the launcher to show.
        fault_path = Path(folder) / f"rank{os.environ.get('RANK', '?')}.fault.txt"
        faulthandler.enable(file=open(fault_path, "w"), all_threads=True)  # noqa: SIM115 (open until exit)
    try:
        main()
    except BaseException as exc:
        folder, rank = os.environ.get(RESULTS_ENV), os.environ.get("RANK", "?")
        if folder:
            _write_json(Path(folder) / f"rank{rank}.error.json", {
                "rank": int(rank) if rank.isdigit() else rank, "time": time.time(), "type": type(exc).__name__,
                "message": str(exc), "traceback": traceback.format_exc(limit=20), "pid": os.getpid(),
            })
        raise
    finally:
        # Free DDP reducers, hooks and pending work while the interpreter is whole: left to
        # interpreter shutdown, gloo's threads can release Python objects after the GIL is gone.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()

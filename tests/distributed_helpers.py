"""A torchrun entry point that misbehaves on request, to test the launcher's failure handling.

    python -m distributed_helpers --mode raise --rank 1   (run by launch() with tests/ on PYTHONPATH)

Modes: ``ok`` (one all-reduce, report the port), ``raise`` (rank `--rank` raises after a few
steps), ``hang`` (rank `--rank` stops taking part, so its peers wait in a collective until its
timeout), ``sleep`` (every rank sleeps: only the launcher's own timeout ends it), ``abort`` (rank
`--rank` dies of SIGABRT, as native code does when a C++ error reaches std::terminate), ``abort-at-exit``
(the same after it wrote its results). ``--group`` runs the all-reduces in a group made by
``worker.new_group`` instead of the default group.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from workbench.distributed import worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ok", "raise", "hang", "sleep", "abort", "abort-at-exit"), default="ok")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--group", action="store_true", help="all-reduce in a group of its own")
    args = parser.parse_args()
    w = worker.init(what="distributed_helpers")
    group = worker.new_group(w) if args.group else None
    t = torch.ones(4)
    for step in range(5):
        if w.rank == args.rank and step == 2:
            if args.mode == "raise":
                raise RuntimeError(f"injected failure on rank {w.rank} at step {step}")
            if args.mode == "hang":
                time.sleep(3600)
            if args.mode == "abort":
                os.abort()
        if args.mode == "sleep":
            time.sleep(3600)
        dist.all_reduce(t, group=group)
        worker.log(w, f"step {step}")
    worker.write_result(w, {"sum": t.tolist(), "pid": os.getpid()})
    if args.mode == "abort-at-exit" and w.rank == args.rank:
        os.abort()


if __name__ == "__main__":
    worker.run_main(main)

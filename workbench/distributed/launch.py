"""Launch a torchrun job from Python: a free port, streamed progress, each rank's results, fail-fast errors.

``launch("workbench.distributed.ddp", 2, ["--epochs", "3"])`` runs the equivalent of::

    python -m torch.distributed.run --nnodes=1 --nproc_per_node=2 \\
        --master_addr=127.0.0.1 --master_port=<free port> -m workbench.distributed.ddp --epochs 3

(``--standalone`` also finds a free port, but inside torchrun where it cannot be reported or
retried; here the port is chosen, and changed if it turns out to be taken.) Each rank writes its
results to a temporary folder (see :mod:`workbench.distributed.worker`); they come back as a
list of dicts, one per rank. When a rank dies, torchrun stops the others within a fraction of a
second; this function then raises a :class:`LaunchError` that names the rank and its error, and
kills anything left of the job, so no process outlives the call. A rank that is stopped (SIGSTOP,
a debugger) neither fails nor dies, and torchrun would wait on it; the launcher watches the ranks'
process states and ends the job once one has been stopped for the collective timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from workbench.errors import WorkbenchError

__all__ = ["launch", "LaunchError", "RankFailure", "free_port", "port_is_free", "job_pids"]

# The same names as worker.py (not imported: this module must stay free of torch, so it imports fast).
RESULTS_ENV = "WORKBENCH_DIST_RESULTS"
TIMEOUT_ENV = "WORKBENCH_DIST_TIMEOUT_S"
LAUNCH_ID_ENV = "WORKBENCH_LAUNCH_ID"
_PORT_RETRIES = 3
DEFAULT_COLLECTIVE_TIMEOUT_S = 30.0
_WATCH_EVERY_S = 0.5  # how often the ranks' process states are read


@dataclass(frozen=True)
class RankFailure:
    """How one rank ended: its exit code (negative: killed by that signal) and the error it reported."""

    rank: int
    exitcode: int | None
    error: str
    root_cause: bool = False
    traceback: str = ""


class LaunchError(WorkbenchError):
    """A distributed job failed. ``failures`` lists the ranks, root cause first; ``output`` is torchrun's output."""

    def __init__(self, message: str, failures: Sequence[RankFailure] = (), output: str = ""):
        super().__init__(message)
        self.failures = list(failures)
        self.output = output


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP server could listen on `host`:`port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (it can be taken before it is used: :func:`launch` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def job_pids(launch_id: str) -> list[int]:
    """Pids of live processes started by the launch tagged `launch_id` (Linux /proc; psutil elsewhere).

    torchrun starts each rank in a session of its own, so killing torchrun's process group does
    not reach them; the environment tag does, even for a rank whose parent already died.
    """
    needle = f"{LAUNCH_ID_ENV}={launch_id}".encode()
    pids = []
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0") and not _is_zombie(entry):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                continue
        return pids
    try:
        import psutil
    except ImportError:
        return []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(LAUNCH_ID_ENV) == launch_id and p.pid != os.getpid():
                pids.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def _is_zombie(entry: Path) -> bool:
    stat = (entry / "stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"


def _kill_job(proc: subprocess.Popen, launch_id: str) -> None:
    """SIGTERM torchrun (it forwards the signal to every rank), then SIGKILL whatever is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    deadline = time.monotonic() + 10
    while (pids := job_pids(launch_id)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


_BLOCK = re.compile(r"\brank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", re.S)


def _torchrun_failures(output: str) -> dict[int, tuple[int, bool]]:
    """{rank: (exitcode, torchrun's root cause?)} from torchrun's ChildFailedError summary."""
    found: dict[int, tuple[int, bool]] = {}
    if "Root Cause" not in output:
        return found
    head, _, root = output.rpartition("Root Cause")
    failures_part = head[head.rfind("Failures:"):] if "Failures:" in head else ""
    for text, is_root in ((failures_part, False), (root, True)):
        for m in _BLOCK.finditer(text):
            found[int(m.group(1))] = (int(m.group(2)), is_root)
    return found


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _failures(output: str, results: Path, nprocs: int) -> list[RankFailure]:
    """Who failed and why, root cause first: a rank killed by a signal torchrun did not send, then the
    earliest exception a rank reported, then torchrun's own guess."""
    errors = {}
    for f in results.glob("rank*.error.json"):
        try:
            e = json.loads(f.read_text())
            errors[int(e["rank"])] = e
        except (ValueError, KeyError, OSError):
            continue
    exits = _torchrun_failures(output)
    failures = []
    for rank in range(nprocs):
        code, torchrun_root = exits.get(rank, (None, False))
        if rank in errors:
            e = errors[rank]
            text = f"{e['type']}: {e['message']}".strip().rstrip(".")
            order = (1, e["time"])
        elif code is not None and code < 0 and -code != signal.SIGTERM:
            text = _signal_text(code)
            if (results / f"rank{rank}.json").is_file():
                text += " after it had written its results (so while shutting down)"
            order = (0, 0.0)
        elif code is not None and code < 0:
            text = f"stopped by torchrun ({_signal_name(code)}) after another rank failed"
            order = (3, 0.0)
        elif code is not None:
            text = f"exited with code {code} without reporting an exception"
            order = (2, 0.0)
        else:
            continue
        tb = errors.get(rank, {}).get("traceback", "")
        if not tb and code is not None and code < 0 and -code != signal.SIGTERM:
            tb = _native_report(output, results / f"rank{rank}.fault.txt")
        failures.append((order, torchrun_root, RankFailure(rank, code, text, traceback=tb)))
    # Tie-break equal orders by torchrun's root cause, then by rank.
    failures.sort(key=lambda t: (t[0], not t[1], t[2].rank))
    return [RankFailure(f.rank, f.exitcode, f.error, root_cause=(i == 0), traceback=f.traceback)
            for i, (_, _, f) in enumerate(failures)]


def _signal_text(code: int) -> str:
    sig = -code
    why = {signal.SIGKILL: "e.g. by the out-of-memory killer or a user",
           signal.SIGABRT: "a fatal error in native code (torch, gloo) called abort()",
           signal.SIGSEGV: "a crash in native code (torch, gloo)",
           signal.SIGBUS: "a crash in native code (torch, gloo)"}.get(sig, "a signal from outside the job")
    return f"killed by {_signal_name(code)} (exit code {code}): {why}"


# What native code prints on its way down (C++ exceptions that reach std::terminate, gloo's checks).
_NATIVE = re.compile(r"terminate called|what\(\)|enforce fail|Fatal Python error|Segmentation fault|Aborted")


def _native_report(output: str, fault_file: Path) -> str:
    """The native error lines of the job's output and the rank's Python stacks at the signal."""
    lines = [ln for ln in output.splitlines() if _NATIVE.search(ln)][-6:]
    try:
        stacks = [ln for ln in fault_file.read_text().strip().splitlines() if not ln.startswith("Extension modules:")]
    except OSError:
        stacks = []
    return "\n".join(lines + (["Python stacks at the signal (faulthandler):"] + stacks[:30] if stacks else []))


def _rank_states(parent: int, ranks: dict[int, int]) -> dict[int, tuple[int, str]]:
    """{rank: (pid, state letter)} of torchrun's worker processes, from /proc (empty elsewhere).

    `ranks` caches pid -> rank (read once from the process's ``RANK`` environment variable).
    """
    states: dict[int, tuple[int, str]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return states
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if int(ppid) != parent:
                continue
            if pid not in ranks:
                env = (entry / "environ").read_bytes().split(b"\0")
                found = [int(e[5:]) for e in env if e.startswith(b"RANK=") and e[5:].isdigit()]
                if not found:
                    continue
                ranks[pid] = found[0]
        except (OSError, ValueError):  # gone meanwhile
            continue
        states[ranks[pid]] = (pid, state)
    return states


@dataclass
class _StallWatch:
    """Notices a rank whose process stays stopped (state T: SIGSTOP, SIGTSTP; t: a debugger) for `after` seconds.

    Such a rank never reaches its collective's timeout and does not die of torchrun's SIGTERM
    (a stopped process only takes SIGKILL), so without this the job would wait on it.
    """

    parent: int
    after: float
    since: dict = field(default_factory=dict)   # rank -> (pid, when it was first seen stopped)
    ranks: dict = field(default_factory=dict)   # pid -> rank
    checked: float = 0.0

    def check(self) -> tuple[int, int, float] | None:
        """(rank, pid, seconds stopped) of a rank stopped for `after` seconds, else None (reads /proc every 0.5 s)."""
        now = time.monotonic()
        if now - self.checked < _WATCH_EVERY_S:
            return None
        self.checked = now
        states = _rank_states(self.parent, self.ranks)
        for rank, (pid, state) in states.items():
            if state not in ("T", "t"):
                self.since.pop(rank, None)
            elif self.since.get(rank, (None,))[0] != pid:
                self.since[rank] = (pid, now)
        for rank in list(self.since):
            if rank not in states:  # gone
                del self.since[rank]
        stalled = [(now - t, rank, pid) for rank, (pid, t) in self.since.items() if now - t >= self.after]
        if not stalled:
            return None
        seconds, rank, pid = max(stalled)
        return rank, pid, seconds


def _read_lines(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        q.put(line.rstrip("\n"))
    q.put(None)


def _run_once(cmd: list[str], env: dict[str, str], *, timeout: float, launch_id: str,
              echo: Callable[[str], None] | None, stall_after: float | None = None,
              ) -> tuple[int | None, str, bool, tuple[int, int, float] | None]:
    """Run torchrun; return (exit code or None on timeout or stall, all output, port taken?,
    (rank, pid, seconds) of a rank stopped for `stall_after` seconds, which ended the job)."""
    # A session of its own, so that one killpg reaches torchrun and anything it forked.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    lines: list[str] = []
    q: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, q), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    timed_out = swept = False
    watch = _StallWatch(proc.pid, stall_after) if stall_after else None
    stalled = None
    try:
        while True:
            if watch is not None and not swept and (stalled := watch.check()) is not None:
                # It cannot take SIGTERM while stopped: kill it now, so that torchrun's own
                # shutdown (SIGTERM to every rank, then a 30 s wait) does not wait on it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stalled[1], signal.SIGKILL)
                break
            try:
                line = q.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if proc.poll() is not None and not swept:
                    # torchrun is gone but the pipe is still open: a rank outlived it. Kill it, then
                    # read what is left (the pipe closes when the last writer dies).
                    _kill_job(proc, launch_id)
                    swept = True
                continue
            if line is None:
                break
            lines.append(line)
            if echo is not None and line.startswith("[rank"):
                echo(line)
        if not timed_out and stalled is None:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        # Always, also on KeyboardInterrupt (a notebook's stop button): nothing of the job survives.
        _kill_job(proc, launch_id)
    reader.join(timeout=1)
    output = "\n".join(lines)
    port_taken = "EADDRINUSE" in output and "Root Cause" not in output and stalled is None
    return (None if timed_out or stalled else proc.returncode), output, port_taken, stalled


def launch(module: str, nprocs: int, args: Sequence[str] = (), *, timeout: float = 300.0,
           env: Mapping[str, str] | None = None, collective_timeout: float | None = None, port: int | None = None,
           progress: bool | Callable[[str], None] | None = None) -> list[dict]:
    """Run ``python -m <module> <args>`` on `nprocs` processes of this machine under torchrun.

    Args:
        module: the entry point, e.g. ``"workbench.distributed.ddp"``; it must report through
            :func:`workbench.distributed.worker.write_result` (every workbench entry point does).
        nprocs: number of processes (ranks), >= 1.
        args: its command-line arguments.
        timeout: seconds for the whole job; past it every process is killed and LaunchError raised.
        env: extra environment variables for the ranks (e.g. ``{"PYTHONPATH": ...}``).
        collective_timeout: seconds any collective may wait for a peer before it fails (default
            ``$WORKBENCH_DIST_TIMEOUT_S`` or 30); a rank stopped this long (SIGSTOP) ends the job.
        port: the rendezvous port to try first; if it is taken (or None), a free one is picked.
        progress: echo the ranks' ``[rank r] ...`` lines: True prints them, a callable receives them,
            None prints unless CI or WORKBENCH_PROGRESS=0.

    Returns:
        Each rank's results dict (with ``rank``, ``world_size``, ``backend``), ordered by rank.

    Raises:
        WorkbenchError: bad arguments.
        LaunchError: a rank failed (the message names the rank and its error), a rank was stopped
            for `collective_timeout` seconds (named), the job ran past `timeout`, or the ranks'
            results are missing or disagree on the world size. A rank
            that dies of a signal after every rank has written its results (a crash while shutting
            down) is a RuntimeWarning instead, and the results are returned.

    Example:
        >>> results = launch("workbench.distributed.allreduce", 2, ["--numel", "1000"])  # doctest: +SKIP
        >>> [r["rank"] for r in results]  # doctest: +SKIP
        [0, 1]
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise WorkbenchError(f"nprocs must be an integer >= 1 (the number of processes to start), got {nprocs!r}")
    if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        raise WorkbenchError(f"module must be a dotted Python module name such as 'workbench.distributed.ddp', "
                             f"got {module!r}")
    if isinstance(args, str):
        raise WorkbenchError(f"args must be a list of strings (one per word), got the string {args!r}")
    given = collective_timeout
    where = f" (from ${TIMEOUT_ENV})" if given is None else ""
    if given is None:
        given = os.environ.get(TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        collective_timeout = float(given)
    except (TypeError, ValueError):
        collective_timeout = float("nan")  # refused just below
    if not timeout > 0 or not collective_timeout > 0:
        raise WorkbenchError(f"timeouts must be positive seconds, got timeout={timeout}, "
                             f"collective_timeout={given!r}{where}")
    echo = _echo(progress)
    launch_id = uuid.uuid4().hex
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="workbench-dist-") as tmp:
        results = Path(tmp)
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WORKBENCH_PROGRESS": "0",
                     **(env or {}), RESULTS_ENV: tmp, TIMEOUT_ENV: str(collective_timeout),
                     LAUNCH_ID_ENV: launch_id}
        tried: list[int] = []
        for _ in range(_PORT_RETRIES):
            candidate = port if (port and not tried and port_is_free(port)) else free_port()
            tried.append(candidate)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0",
                   f"--nproc_per_node={nprocs}", "--master_addr=127.0.0.1", f"--master_port={candidate}",
                   "--max_restarts=0", "--monitor_interval=0.1", "-m", module, *[str(a) for a in args]]
            left = timeout - (time.monotonic() - start)
            code, output, port_taken, stalled = _run_once(cmd, child_env, timeout=max(left, 1.0),
                                                          launch_id=launch_id, echo=echo,
                                                          stall_after=collective_timeout)
            if not port_taken:
                break
        if port_taken:
            raise LaunchError(f"could not start {module}: ports {tried} were all taken by the time torchrun bound "
                              "them; retry, or free some ports", output=output)
        if stalled is not None:
            rank, pid, seconds = stalled
            failure = RankFailure(rank, -signal.SIGKILL, f"stopped (pid {pid}) for {seconds:.0f} s, then killed",
                                  root_cause=True)
            raise LaunchError(f"{module} on {nprocs} processes: rank {rank} did not respond within "
                              f"{collective_timeout:g} s (stopped or hung: its process {pid} was stopped, e.g. by "
                              f"SIGSTOP); the job was ended and no process is left", [failure], output)
        if code is None:
            failures = _failures(output, results, nprocs)
            raise LaunchError(
                f"{module} on {nprocs} processes ran past its timeout of {timeout:.0f} s and was killed (all its "
                f"processes are gone){_summary(failures)}. Raise `timeout` if it is just slow.\n{_tail(output)}",
                failures, output)
        if code != 0:
            failures = _failures(output, results, nprocs)
            if not failures:
                raise LaunchError(f"torchrun failed (exit code {code}) before any rank reported:\n{_tail(output)}",
                                  output=output)
            root = failures[0]
            if (all((results / f"rank{r}.json").is_file() for r in range(nprocs))
                    and all(f.exitcode is not None and f.exitcode < 0 for f in failures)
                    and not any(results.glob("rank*.error.json"))):
                # Every rank finished its work and wrote its results; a crash while tearing down
                # (gloo's threads at interpreter exit) does not change them. Say so, keep them.
                warnings.warn(f"{module}: every rank wrote its results, then rank {root.rank} {root.error}; the "
                              f"results are complete and kept.\n{root.traceback}", RuntimeWarning, stacklevel=2)
                return _collect(results, module, nprocs, output)
            report = root.traceback.strip().splitlines()
            native = root.exitcode is not None and root.exitcode < 0  # a native report, already trimmed
            detail = (f"rank {root.rank}'s {'report' if native else 'traceback'}:\n  "
                      + "\n  ".join(report if native else report[-12:]) if report else _tail(output))
            raise LaunchError(
                f"{module} failed on rank {root.rank} of {nprocs}: {root.error}"
                f"{_silent_peer(failures, collective_timeout)}"
                f"{_summary(failures[1:], 'then ')}. "
                f"torchrun stopped the job; no process is left.\n{detail}", failures, output)
        return _collect(results, module, nprocs, output)


def _silent_peer(failures: Sequence[RankFailure], collective_timeout: float) -> str:
    """When the root cause is a collective's timeout and exactly one rank reported nothing (torchrun then
    stopped it), that rank is the one its peers waited for: say so."""
    if not failures or not re.search(r"timed out", failures[0].error, re.I):
        return ""
    silent = [f.rank for f in failures[1:] if f.exitcode == -signal.SIGTERM and not f.traceback
              and f.error.startswith("stopped by torchrun")]
    if len(silent) != 1:
        return ""
    return f" (rank {silent[0]} did not respond within {collective_timeout:g} s: stopped or hung)"


def _echo(progress: bool | Callable[[str], None] | None) -> Callable[[str], None] | None:
    if callable(progress):
        return progress
    if progress is None:
        from workbench.train import show_progress

        progress = show_progress(None)
    return (lambda line: print(line, flush=True)) if progress else None


def _summary(failures: Sequence[RankFailure], prefix: str = "") -> str:
    if not failures:
        return ""
    return "; " + prefix + "; ".join(f"rank {f.rank}: {_short(f.error)}" for f in failures)


def _short(error: str, n: int = 160) -> str:
    line = error.splitlines()[0] if error else ""
    return line if len(line) <= n else line[:n - 3] + "..."


def _tail(output: str, n: int = 15) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return "last lines of output:\n  " + "\n  ".join(lines[-n:]) if lines else "(no output)"


def _collect(results: Path, module: str, nprocs: int, output: str) -> list[dict]:
    rows = []
    for rank in range(nprocs):
        f = results / f"rank{rank}.json"
        if not f.is_file():
            raise LaunchError(f"{module} exited cleanly but rank {rank} wrote no results (is it an entry point "
                              f"that calls workbench.distributed.worker.write_result?)\n{_tail(output)}",
                              output=output)
        rows.append(json.loads(f.read_text()))
    sizes = {r.get("world_size") for r in rows}
    if sizes != {nprocs} or [r.get("rank") for r in rows] != list(range(nprocs)):
        raise LaunchError(f"mismatched world sizes: launched {nprocs} processes but the ranks report world sizes "
                          f"{sorted(map(str, sizes))} and ranks {[r.get('rank') for r in rows]}; every rank must "
                          "join the same group of the launched size", output=output)
    return rows

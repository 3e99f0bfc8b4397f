"""The update loop: a challenger is compared with the champion on the same new data and promoted only if it is
at least as accurate and within the latency budget; otherwise it is kept out. And the serving side of it:
:class:`Poller`, a server's watch on the alias, which swaps when it moves and tries a version that fails to
load once (logged once), not on every poll.

Example:
    >>> challenger = reg.register_result(wb.run(recipe), name="digits-mlp")       # alias "challenger"
    >>> decision = update(reg, "digits-mlp", challenger, X_new, y_new, latency_budget_us=200)
    >>> decision.promoted, decision.reason
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from ..errors import WorkbenchError
from .registry import CHAMPION, ModelVersion, Registry

__all__ = ["Decision", "decide", "evaluate_pair", "update", "Poller", "swap_target"]

log = logging.getLogger("workbench.serve")


@dataclass(frozen=True)
class Decision:
    """The update loop's verdict, with the numbers it was based on (same data, measured side by side)."""

    promoted: bool
    reason: str
    champion_version: int | None
    challenger_version: int
    champion_accuracy: float | None
    challenger_accuracy: float
    champion_p50_us: float | None
    challenger_p50_us: float
    latency_budget_us: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(*, champion_accuracy: float | None, challenger_accuracy: float, challenger_p50_us: float,
           latency_budget_us: float, min_gain: float = 0.0) -> tuple[bool, str]:
    """The promotion rule: accuracy >= champion's + `min_gain` and p50 latency <= the budget."""
    if not latency_budget_us > 0:
        raise WorkbenchError(f"the latency budget must be a positive number of microseconds, got {latency_budget_us!r}")
    if challenger_p50_us > latency_budget_us:
        return False, (f"too slow: p50 {challenger_p50_us:.0f} us is over the budget of {latency_budget_us:.0f} us")
    if champion_accuracy is None:
        return True, "no champion yet; the challenger is within the latency budget"
    if challenger_accuracy < champion_accuracy + min_gain:
        return False, (f"less accurate: {challenger_accuracy:.4f} < champion's {champion_accuracy:.4f}"
                       + (f" + {min_gain:.4f}" if min_gain else ""))
    return True, (f"at least as accurate ({challenger_accuracy:.4f} >= {champion_accuracy:.4f}) and within the "
                  f"latency budget ({challenger_p50_us:.0f} <= {latency_budget_us:.0f} us)")


def evaluate_pair(paths: dict[str, str | os.PathLike], X: Any, y: Any, *, threads: int = 1,
                  rounds: int = 5, repeats: int = 40) -> dict[str, dict[str, float]]:
    """Accuracy on (X, y) and batch-1 latency of several ONNX files, measured side by side in this process."""
    from .. import onnx as wonnx
    from ..measure import side_by_side

    X = np.ascontiguousarray(np.asarray(X.numpy() if hasattr(X, "numpy") else X, dtype=np.float32))
    y = np.asarray(y.numpy() if hasattr(y, "numpy") else y)
    if len(X) == 0 or len(X) != len(y):
        raise WorkbenchError(f"the evaluation set needs as many labels as examples, got {len(X)} and {len(y)}")
    sessions = {k: wonnx.session(p, threads=threads) for k, p in paths.items()}
    acc = {k: float(np.mean(wonnx.run_session(s, X).argmax(1) == y)) for k, s in sessions.items()}
    x1 = X[:1]
    stats = side_by_side({k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x1})) for k, s in sessions.items()},
                         rounds=rounds, repeats=repeats, threads=threads)
    return {k: {"accuracy": acc[k], "p50_us": stats[k].p50_us} for k in paths}


def update(registry: Registry, name: str, challenger: ModelVersion | int, X: Any, y: Any, *,
           latency_budget_us: float, min_gain: float = 0.0) -> Decision:
    """Compare `challenger` with the champion on (X, y); promote it or keep it out (recorded in the registry).

    Both files are loaded through :meth:`Registry.load` (sha256 verified) and measured in this process,
    so the comparison is on the same data, the same machine, the same moment.
    """
    chall = registry.get(name, challenger.version if isinstance(challenger, ModelVersion) else int(challenger))
    try:
        champ: ModelVersion | None = registry.get(name, CHAMPION)
    except WorkbenchError:
        champ = None
    paths = {"challenger": registry.load(chall)[0]}
    if champ is not None:
        paths["champion"] = registry.load(champ)[0]
    m = evaluate_pair(paths, X, y)
    ok, reason = decide(champion_accuracy=m["champion"]["accuracy"] if champ else None,
                        challenger_accuracy=m["challenger"]["accuracy"],
                        challenger_p50_us=m["challenger"]["p50_us"], latency_budget_us=latency_budget_us,
                        min_gain=min_gain)
    if champ is not None and champ.version == chall.version:
        ok, reason = False, "the challenger already is the champion"
    if ok:
        registry.promote(name, chall.version)
    else:
        registry.reject(name, chall.version, reason)
    return Decision(promoted=ok, reason=reason, champion_version=champ.version if champ else None,
                    challenger_version=chall.version,
                    champion_accuracy=m["champion"]["accuracy"] if champ else None,
                    challenger_accuracy=m["challenger"]["accuracy"],
                    champion_p50_us=m["champion"]["p50_us"] if champ else None,
                    challenger_p50_us=m["challenger"]["p50_us"], latency_budget_us=float(latency_budget_us),
                    n=len(y))


def swap_target(source: Any) -> tuple[str, str]:
    """(version, sha256) that a model source points at now: for a registry alias, the version and the sha256
    recorded at its registration; for a bare file, its bytes' sha256 (twice)."""
    from .models import RegistrySource

    if isinstance(source, RegistrySource):
        v = source.registry.resolve(source.ref)
        return str(v.version), v.sha256
    current = source.current()
    return current, current


class Poller:
    """A server's watch on its model source: reload when the alias moves, without hammering a broken version.

    A version that fails to load (its file changed after registration, missing, or not runnable) is
    tried once and logged once; it is tried again only when the registry changes (the alias moves to
    another version). The server keeps serving its current model meanwhile. An explicit reload (``POST
    /admin/reload``) is not affected: it always tries.

    Args:
        source: the server's :class:`~workbench.serve.models.ModelSource`.
        reload: the server's ``reload()`` coroutine function (swaps if the source moved, raises if the load fails).
        logger: where the one line per failure goes.

    Example:
        >>> poller = Poller(server.source, server.reload)
        >>> while True:
        ...     await asyncio.sleep(poll_seconds)
        ...     await poller.step()
    """

    def __init__(self, source: Any, reload: Callable[[], Awaitable[dict[str, Any]]], *,
                 logger: logging.Logger = log) -> None:
        self.source, self.reload, self.log = source, reload, logger
        self.failed: tuple[str, str] | None = None   # the (version, sha256) that failed to load
        self.lookup_error: str | None = None          # the last failed registry lookup, logged once

    async def step(self) -> dict[str, Any] | None:
        """One poll: what ``reload()`` returned, or None when there was nothing to try or it failed."""
        try:
            target = await asyncio.to_thread(swap_target, self.source)
        except Exception as exc:  # the registry is unreachable: keep serving, say so once per distinct error
            msg = _first_line(exc)
            if msg != self.lookup_error:
                self.log.error("cannot look up %s (%s); still serving the current model, polling on",
                               _describe(self.source), msg)
            self.lookup_error = msg
            return None
        self.lookup_error = None
        if target == self.failed:
            return None  # the same broken version: tried already, logged already
        try:
            result = await self.reload()
        except Exception as exc:
            self.failed = target
            self.log.error("version %s of %s failed to load (%s); still serving the current model, not retrying "
                           "until the registry changes", target[0], _describe(self.source), _first_line(exc))
            return None
        self.failed = None
        return result


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _describe(source: Any) -> str:
    return source.describe() if hasattr(source, "describe") else repr(source)

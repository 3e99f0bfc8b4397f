"""Where the workbench keeps what it computed, and how a cache entry is written without ever being seen half-done.

Core: used by the pipeline's result cache (:mod:`workbench.recipe.cache`) and by the techniques that
cache a trained model of their own (:mod:`workbench.llm`), so the location rule and the atomic
publish exist once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

__all__ = ["cache_dir", "publish_dir"]

T = TypeVar("T")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where results are cached: `path`, else $WORKBENCH_CACHE, else ~/.cache/workbench."""
    if path is not None:
        return Path(path)
    env = os.environ.get("WORKBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "workbench"


def publish_dir(root: Path, name: str, fill: Callable[[Path], T], *,
                is_complete: Callable[[Path], bool]) -> T:
    """Build ``root/name`` in a temporary folder with ``fill(folder)``, then publish it with one rename.

    An older or damaged entry is moved aside first; if another process published the same name
    meanwhile (the rename fails) and its entry ``is_complete``, that entry is equally valid and ours
    is dropped. The temporary folder never survives, whatever ``fill`` raises.

    Returns:
        What ``fill`` returned.
    """
    entry = root / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        out = fill(tmp)
        if entry.exists():
            stale = root / f".stale-{name}-{os.getpid()}"
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not is_complete(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

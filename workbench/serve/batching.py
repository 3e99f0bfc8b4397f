"""Dynamic batching: requests that arrive together run as one ONNX Runtime call.

A request waits at most ``max_wait_ms`` after the oldest waiting request arrived, or until
``max_batch`` rows are gathered, whichever comes first. A request is never split across batches.
The model is taken when a batch is formed, so a hot swap never mixes two models in one batch and a
batch that is running finishes on the model it started with.

One ORT call on a batch of B rows costs much less than B calls on one row when the weights must be
read from memory for every call (matrix-vector products are memory-bound, matrix-matrix products
reuse each weight B times); on a tiny model in cache the HTTP handling dominates and batching buys
little. ``workbench.serve.bench`` measures both.

Example:
    >>> batcher = DynamicBatcher(lambda model, x: model.run(x), lambda: current, max_batch=32, max_wait_ms=2)
    >>> await batcher.start(); outputs, model = await batcher.submit(x)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import WorkbenchError

__all__ = ["DynamicBatcher", "BatchInfo"]


@dataclass(frozen=True)
class BatchInfo:
    """What one ORT call did: how many requests and rows, how long it ran and waited."""

    requests: int
    rows: int
    run_seconds: float
    wait_seconds: float


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """Gather concurrent requests into batches and run them on one worker thread.

    Args:
        run: ``run(model, x) -> outputs`` for a batch ``x`` (rows along axis 0); runs on the worker thread.
        get_model: returns the model to use for the next batch (called when a batch is formed).
        max_batch: most rows per call (1 turns batching off: one call per request).
        max_wait_ms: longest a request waits for others to join its batch.
        on_batch: called on the event loop after each batch with a :class:`BatchInfo`.
    """

    def __init__(self, run: Callable[[Any, np.ndarray], np.ndarray], get_model: Callable[[], Any], *,
                 max_batch: int = 32, max_wait_ms: float = 2.0,
                 on_batch: Callable[[BatchInfo], None] | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise WorkbenchError(f"max_batch must be a whole number >= 1 (1 turns batching off), got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 1000:
            raise WorkbenchError(f"max_wait_ms must be between 0 and 1000 ms, got {max_wait_ms!r}")
        self._run, self._get_model, self._on_batch = run, get_model, on_batch
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: deque[_Pending] = deque()
        self._rows = 0  # rows waiting in the queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Future | None = None
        self._waiting_first = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._queue.clear()
        self._rows = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort-batch")
        self._task = self._loop.create_task(self._worker(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Finish the batch that is running, fail the waiting requests, stop the worker."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=True)
        self._task = self._executor = None

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """Queue `x` (rows along axis 0); returns its outputs and the model that computed them.

        A request with more rows than ``max_batch`` runs alone, as one call.
        """
        if self._task is None:
            raise RuntimeError("the batcher is not running; await start() first")
        future = self._loop.create_future()
        self._queue.append(_Pending(x, future, time.perf_counter()))
        self._rows += len(x)
        # Wake the worker when it waits for a first request, or when its batch is now full.
        if self._wake is not None and not self._wake.done() and (self._waiting_first or self._rows >= self.max_batch):
            self._wake.set_result(None)
        return await future

    async def _sleep_until(self, deadline: float | None) -> None:
        """Sleep until woken by submit() or until `deadline` (one future and one timer, no task per request)."""
        self._wake = self._loop.create_future()
        timer = None
        if deadline is not None:
            timer = self._loop.call_later(max(0.0, deadline - time.perf_counter()),
                                          lambda f=self._wake: f.done() or f.set_result(None))
        try:
            await self._wake
        finally:
            if timer is not None:
                timer.cancel()
            self._wake = None

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._waiting_first = True
            try:
                await self._sleep_until(None)
            finally:
                self._waiting_first = False
        deadline = self._queue[0].arrived + self.max_wait
        if self._rows < self.max_batch and time.perf_counter() < deadline:
            await self._sleep_until(deadline)
        batch, rows = [], 0
        while self._queue and (not batch or rows + len(self._queue[0].x) <= self.max_batch):
            p = self._queue.popleft()
            batch.append(p)
            rows += len(p.x)
        self._rows -= rows
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [p for p in batch if not p.future.cancelled()]  # the client went away
            if not batch:
                continue
            model = self._get_model()
            started = time.perf_counter()
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
                out = await loop.run_in_executor(self._executor, self._run, model, x)
            except Exception as exc:  # one bad batch fails its requests, never the worker
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result((out[start:start + len(p.x)], model))
                start += len(p.x)
            if self._on_batch is not None:
                self._on_batch(BatchInfo(requests=len(batch), rows=len(x), run_seconds=elapsed,
                                         wait_seconds=started - batch[0].arrived))

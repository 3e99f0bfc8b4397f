"""A load generator for the server: closed loop at a concurrency, open loop at a rate; loopback only.

* **Closed loop**: `concurrency` clients, each sends its next request as soon as the previous one is
  answered. Throughput is what the server sustains; latency grows with the queue.
* **Open loop**: requests are sent on a fixed schedule (`rate` per second) whatever the server does,
  as real users do. Latency is measured from the *scheduled* send time, so a stalled server is not
  hidden by the client waiting for it (the "coordinated omission" mistake).

The client is a small HTTP/1.1 keep-alive client on asyncio streams: an off-the-shelf async client
costs several times more CPU per request, which on a 2-core machine is taken from the server under
test. Runs are bounded in time and refuse any host but 127.0.0.1/localhost/::1.

Example:
    >>> r = closed_loop(server.url + "/predict", payloads, concurrency=32, duration_s=5)
    >>> r.rps, r.p99_ms, r.errors
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Coroutine, Sequence
from urllib.parse import urlsplit

import numpy as np

from ..errors import WorkbenchError

__all__ = ["LoadResult", "closed_loop", "open_loop", "payloads_from", "MAX_DURATION_S"]

MAX_DURATION_S = 600.0
MAX_CONNECTIONS = 512
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    """What a load run measured. Latencies in milliseconds.

    `timeline` has one row per request: send time (s from the start), latency (ms), HTTP status (0: no
    answer) and the model version that answered (NaN if none or not a number), sorted by send time.
    """

    mode: str
    concurrency: int | None
    rate: float | None
    duration_s: float
    requests: int
    ok: int
    errors: int
    status_counts: dict[str, int]
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    versions: dict[str, int] = field(default_factory=dict)
    timeline: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("timeline")
        return d


def payloads_from(X: Any, *, rows: int = 1, count: int = 64) -> list[bytes]:
    """`count` JSON bodies of `rows` examples each, cycling through the rows of X (numpy or torch)."""
    arr = np.asarray(X.numpy() if hasattr(X, "numpy") else X, dtype=np.float32)
    if len(arr) == 0:
        raise WorkbenchError("payloads_from needs at least one example")
    out = []
    for i in range(count):
        idx = [(i * rows + j) % len(arr) for j in range(rows)]
        out.append(json.dumps({"inputs": np.round(arr[idx], 5).tolist()}).encode())
    return out


def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise WorkbenchError(f"the load generator speaks plain http to this machine only, got {url!r}")
    if parts.hostname not in _LOOPBACK:
        raise WorkbenchError(f"the load generator only targets this machine (127.0.0.1, localhost, ::1), not "
                             f"{parts.hostname!r}: load tests against other hosts are not its job")
    return parts.hostname, parts.port or 80, parts.path or "/"


def _check_duration(duration_s: float) -> float:
    if not isinstance(duration_s, (int, float)) or not 0 < duration_s <= MAX_DURATION_S:
        raise WorkbenchError(f"duration_s must be in (0, {MAX_DURATION_S:.0f}] seconds, got {duration_s!r}")
    return float(duration_s)


class _Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _head(host: str, port: int, path: str, length: int, api_key: str | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {length}"]
    if api_key:
        lines.append(f"X-API-Key: {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _one(conn: _Connection, host: str, port: int, path: str, body: bytes, api_key: str | None,
               timeout_s: float) -> tuple[int, str | None]:
    try:
        status, data = await asyncio.wait_for(conn.request(_head(host, port, path, len(body), api_key), body),
                                              timeout_s)
    except (OSError, asyncio.TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
        conn.close()
        return 0, None  # status 0: no answer (refused, reset, timed out)
    version = None
    if status == 200:
        try:
            version = str(json.loads(data)["version"])
        except (ValueError, KeyError):
            status = -1  # a 200 without a valid answer counts as an error
    return status, version


def _summarize(mode: str, rows: list[tuple[float, float, int, str | None]], elapsed: float, *,
               concurrency: int | None = None, rate: float | None = None) -> LoadResult:
    timeline = np.array([(t, ms, s, float(v) if v is not None and v.isdigit() else np.nan) for t, ms, s, v in rows],
                        dtype=np.float64).reshape(-1, 4)
    statuses: dict[str, int] = {}
    versions: dict[str, int] = {}
    for _, _, s, v in rows:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
        if v is not None:
            versions[v] = versions.get(v, 0) + 1
    timeline = timeline[np.argsort(timeline[:, 0], kind="stable")]
    ok = statuses.get("200", 0)
    lat = timeline[timeline[:, 2] == 200, 1] if len(timeline) else np.zeros(0)
    p50, p90, p99 = (np.percentile(lat, [50, 90, 99]) if len(lat) else (float("nan"),) * 3)
    return LoadResult(mode=mode, concurrency=concurrency, rate=rate, duration_s=elapsed, requests=len(rows), ok=ok,
                      errors=len(rows) - ok, status_counts=statuses, rps=ok / elapsed if elapsed > 0 else 0.0,
                      p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                      max_ms=float(lat.max()) if len(lat) else float("nan"), versions=versions, timeline=timeline)


async def _closed(url: str, payloads: Sequence[bytes], concurrency: int, duration_s: float, api_key: str | None,
                  timeout_s: float, warmup_s: float) -> LoadResult:
    host, port, path = _target(url)
    t0 = time.perf_counter()
    start_measure = t0 + warmup_s
    stop_at = start_measure + duration_s
    rows: list[tuple[float, float, int, str | None]] = []

    async def client(i: int) -> None:
        conn = _Connection(host, port)
        n = i
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                status, version = await _one(conn, host, port, path, payloads[n % len(payloads)], api_key, timeout_s)
                done = time.perf_counter()
                if sent >= start_measure:
                    rows.append((sent - start_measure, 1000 * (done - sent), status, version))
                n += concurrency
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return _summarize("closed", rows, min(time.perf_counter(), stop_at) - start_measure, concurrency=concurrency)


async def _open(url: str, payloads: Sequence[bytes], rate: float, duration_s: float, api_key: str | None,
                timeout_s: float, seed: int | None) -> LoadResult:
    host, port, path = _target(url)
    n = int(rate * duration_s)
    if seed is None:  # evenly spaced
        offsets = np.arange(n) / rate
    else:  # Poisson arrivals
        offsets = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
        offsets = offsets[offsets < duration_s]
    idle: list[_Connection] = []
    open_count = 0
    rows: list[tuple[float, float, int, str | None]] = []
    slots = asyncio.Semaphore(MAX_CONNECTIONS)
    t0 = time.perf_counter() + 0.05

    async def fire(i: int, due: float) -> None:
        nonlocal open_count
        async with slots:  # beyond MAX_CONNECTIONS a request waits; its latency still counts from `due`
            if idle:
                conn = idle.pop()
            else:
                conn = _Connection(host, port)
                open_count += 1
            status, version = await _one(conn, host, port, path, payloads[i % len(payloads)], api_key, timeout_s)
            rows.append((due - t0, 1000 * (time.perf_counter() - due), status, version))
            idle.append(conn)

    tasks = []
    for i, off in enumerate(offsets):
        due = t0 + float(off)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return _summarize("open", rows, duration_s, rate=rate)


def _run(coro: Coroutine) -> Any:
    """Run a coroutine to completion, also from inside Jupyter (whose thread already runs an event loop).

    The objects alive before the run are frozen out of the garbage collector meanwhile: in a process
    that has imported torch, one full collection stalls every client for 100+ ms, which would be
    measured as server latency.
    """
    gc.collect()
    gc.freeze()
    try:
        return _run_now(coro)
    finally:
        gc.unfreeze()


def _run_now(coro: Coroutine) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="loadtest")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def closed_loop(url: str, payloads: Sequence[bytes], *, concurrency: int = 32, duration_s: float = 5.0,
                api_key: str | None = None, timeout_s: float = 10.0, warmup_s: float = 0.5) -> LoadResult:
    """`concurrency` clients back to back for `duration_s` seconds (after `warmup_s` not counted).

    Args:
        url: the ``/predict`` URL on 127.0.0.1.
        payloads: request bodies, used in turn (see :func:`payloads_from`).
        concurrency: clients, each with one request in flight.
        duration_s: measured seconds (at most 600).
        api_key: sent as ``X-API-Key``.
        timeout_s: a request unanswered after this counts as an error (status 0).
        warmup_s: seconds run first and not counted (connections, caches).
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONNECTIONS:
        raise WorkbenchError(f"concurrency must be a whole number in 1..{MAX_CONNECTIONS}, got {concurrency!r}")
    if not payloads:
        raise WorkbenchError("give at least one request body (workbench.serve.loadtest.payloads_from(X))")
    _target(url)
    return _run(_closed(url, list(payloads), concurrency, _check_duration(duration_s), api_key, timeout_s,
                        max(0.0, warmup_s)))


def open_loop(url: str, payloads: Sequence[bytes], *, rate: float = 200.0, duration_s: float = 5.0,
              api_key: str | None = None, timeout_s: float = 10.0, seed: int | None = None) -> LoadResult:
    """Send `rate` requests per second for `duration_s` seconds, whatever the server's pace.

    Args:
        rate: requests per second (evenly spaced; with `seed`, Poisson arrivals at that mean rate).
        seed: seed of the Poisson arrival times (None: evenly spaced).
        (the rest as in :func:`closed_loop`)
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 100_000:
        raise WorkbenchError(f"rate must be in (0, 100000] requests per second, got {rate!r}")
    if not payloads:
        raise WorkbenchError("give at least one request body (workbench.serve.loadtest.payloads_from(X))")
    _target(url)
    return _run(_open(url, list(payloads), float(rate), _check_duration(duration_s), api_key, timeout_s, seed))

"""The inference server: FastAPI over ONNX Runtime, with dynamic batching, Prometheus metrics and hot swaps.

Routes (the Dockerfile, the Kubernetes manifests and the Prometheus config use exactly these):

* ``POST /predict``       ``{"inputs": [example, ...]}`` -> ``{"model", "version", "predictions", "probabilities"}``;
  every bad input is a 4xx with a one-line ``detail``, never a 500.
* ``GET /health``         readiness: 200 when a model is loaded and the batcher runs, else 503.
* ``GET /health/live``    liveness: 200 while the process answers.
* ``GET /model``          name, version, recipe, sha256, input shape; the last failed load, if any.
* ``GET /metrics``        Prometheus text format.
* ``POST /admin/reload``  look up the alias now and swap if it moved (the server also polls).

A swap loads the new version beside the old one, runs it once on zeros, then replaces one
reference: batches formed before keep the old model and finish on it. If the new version fails to
load, the server keeps serving the old one, counts the failure and shows it in ``/model`` and ``/health``.

Run it with ``workbench serve --model digits-mlp@champion`` (127.0.0.1:8000 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from ..errors import WorkbenchError
from . import DEFAULT_HOST, DEFAULT_PORT
from .batching import BatchInfo, DynamicBatcher
from .models import FileSource, LoadedModel, ModelSource, RegistrySource
from .validate import BadInput, parse_inputs

__all__ = ["ServeSettings", "LoadedModel", "RegistrySource", "FileSource", "parse_inputs", "create_app",
           "run_server", "DEFAULT_HOST", "DEFAULT_PORT", "ROUTES", "METRIC_NAMES"]

log = logging.getLogger("workbench.serve")

ROUTES = {"predict": "/predict", "ready": "/health", "live": "/health/live", "model": "/model",
          "metrics": "/metrics", "reload": "/admin/reload"}
METRIC_NAMES = ("workbench_http_requests_total", "workbench_http_request_duration_seconds", "workbench_batch_size",
                "workbench_batch_run_seconds", "workbench_model_version", "workbench_model_info",
                "workbench_predictions_total", "workbench_reference_class_share",
                "workbench_model_load_failures_total", "workbench_model_swaps_total", "workbench_queue_depth")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts.

    Args:
        max_batch: most rows per ONNX Runtime call (1 = no batching).
        max_wait_ms: longest a request waits for others to join its batch.
        max_rows: most examples in one request (more is a 413).
        max_body_bytes: largest request body (more is a 413).
        api_key: if set, ``/predict``, ``/model`` and ``/admin/reload`` need it in ``X-API-Key``.
        poll_seconds: how often to look up the alias for a new version (0: only on ``/admin/reload``).
        threads: ONNX Runtime intra-op threads.
    """

    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_rows: int = 256
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    poll_seconds: float = 5.0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_rows", "max_body_bytes", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkbenchError(f"ServeSettings.{name} must be a whole number >= 1, got {value!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise WorkbenchError(f"ServeSettings.max_wait_ms must be in [0, 1000], got {self.max_wait_ms!r}")
        if not self.poll_seconds >= 0:
            raise WorkbenchError(f"ServeSettings.poll_seconds must be >= 0 (0: no polling), got {self.poll_seconds!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise WorkbenchError("an API key must be at least 8 characters long")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = bool(self.api_key)  # never echo the key
        return d


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps can share a process)."""

    def __init__(self, queue_depth: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only double the scrape size
        self.registry = r = CollectorRegistry()
        self.requests = Counter("workbench_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("workbench_http_request_duration_seconds", "Time to answer a request",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("workbench_batch_size", "Rows per ONNX Runtime call", buckets=_BATCH_BUCKETS,
                               registry=r)
        self.batch_run = Histogram("workbench_batch_run_seconds", "Time of one ONNX Runtime call",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.version = Gauge("workbench_model_version", "Version of the model being served", ["name"], registry=r)
        self.info = Gauge("workbench_model_info", "The model being served (value 1)", ["name", "version", "sha256"],
                          registry=r)
        self.predictions = Counter("workbench_predictions", "Predicted classes (watch their shares for drift)",
                                   ["class"], registry=r)
        self.reference = Gauge("workbench_reference_class_share",
                               "Share of each class predicted on the evaluation set at registration", ["class"],
                               registry=r)
        self.load_failures = Counter("workbench_model_load_failures", "Versions that failed to load (old one kept)",
                                     registry=r)
        self.swaps = Counter("workbench_model_swaps", "Hot swaps to a new version", registry=r)
        Gauge("workbench_queue_depth", "Requests waiting for a batch", registry=r).set_function(queue_depth)
        self._info_labels: tuple[str, ...] | None = None

    def set_model(self, m: LoadedModel) -> None:
        if self._info_labels is not None:
            self.info.remove(*self._info_labels)
        self._info_labels = (m.name, str(m.version), m.sha256[:16])
        self.info.labels(*self._info_labels).set(1)
        if isinstance(m.version, int):
            self.version.labels(m.name).set(m.version)
        for c in range(m.num_classes):
            self.predictions.labels(str(c))  # export zeros, so rate() has a series from the start
            if m.class_share and len(m.class_share) == m.num_classes:
                self.reference.labels(str(c)).set(m.class_share[c])


class ModelServer:
    """The state behind the app: the current model, the batcher, the metrics, swapping."""

    def __init__(self, source: ModelSource, settings: ServeSettings) -> None:
        self.source, self.settings = source, settings
        self.model = source.load(settings.threads)  # fails loudly at start: nothing to serve yet
        self.last_error: str | None = None
        self.batcher = DynamicBatcher(lambda m, x: m.run(x), lambda: self.model, max_batch=settings.max_batch,
                                      max_wait_ms=settings.max_wait_ms, on_batch=self._on_batch)
        self.metrics = _Metrics(lambda: self.batcher.queued)
        self.metrics.set_model(self.model)
        self._swap_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None

    def _on_batch(self, info: BatchInfo) -> None:
        self.metrics.batch.observe(info.rows)
        self.metrics.batch_run.observe(info.run_seconds)

    async def start(self) -> None:
        await self.batcher.start()
        if self.settings.poll_seconds > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="registry-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.batcher.stop()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            with contextlib.suppress(Exception):  # a failure is recorded in last_error by reload()
                await self.reload()

    async def reload(self) -> dict[str, Any]:
        """Swap to the version the source points at now, if it moved. The old model serves until then."""
        async with self._swap_lock:
            old = self.model
            try:
                target = await asyncio.to_thread(self.source.current)
                if target == str(old.version) or target == old.sha256:
                    self.last_error = None  # the alias points at what is served (again)
                    return {"swapped": False, "version": old.version}
                new = await asyncio.to_thread(self.source.load, self.settings.threads)
            except Exception as exc:
                self.metrics.load_failures.inc()
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.last_error = f"{time.strftime('%H:%M:%S')} {msg}"
                log.error("model reload failed, still serving %s/%s: %s", old.name, old.version, msg)
                raise WorkbenchError(f"could not load the new model ({msg}); still serving "
                                     f"{old.name}/{old.version}") from None
            self.model = new  # one reference: batches formed from now on use the new model
            self.last_error = None
            self.metrics.set_model(new)
            self.metrics.swaps.inc()
            log.warning("swapped %s/%s -> %s/%s", old.name, old.version, new.name, new.version)
            return {"swapped": True, "version": new.version, "previous": old.version}

    async def predict(self, x: np.ndarray) -> dict[str, Any]:
        logits, model = await self.batcher.submit(x)
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        pred = p.argmax(axis=1)
        for c, n in enumerate(np.bincount(pred, minlength=model.num_classes)):
            if n:
                self.metrics.predictions.labels(str(c)).inc(int(n))
        return {"model": model.name, "version": model.version, "predictions": pred.tolist(),
                "probabilities": np.round(p.astype(np.float64), 6).tolist()}


class _MetricsMiddleware:
    """Counts every response by route and status and times it (pure ASGI: cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.known = set(ROUTES.values())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.known else "other"
        status = {"code": 500}
        started = time.perf_counter()

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(source: ModelSource | str | os.PathLike, settings: ServeSettings | None = None, *,
               registry: Any = None) -> Any:
    """Build the FastAPI app; the model is loaded now (an error here means there is nothing to serve).

    Args:
        source: a :class:`RegistrySource`/:class:`FileSource`, a reference ``NAME@ALIAS`` / ``NAME/VERSION``,
            or the path of an ``.onnx`` file.
        settings: batching, limits, API key, polling.
        registry: the :class:`~workbench.serve.registry.Registry` to resolve a reference in (default one).

    Example:
        >>> app = create_app("digits-mlp@champion", ServeSettings(max_batch=32))
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    settings = settings or ServeSettings()
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        source = FileSource(text) if text.endswith(".onnx") else RegistrySource(text, registry=registry)
    server = ModelServer(source, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="workbench model server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    def authorized(request: Request) -> bool:
        if not settings.api_key:
            return True
        given = request.headers.get("x-api-key")
        if given is None and request.headers.get("authorization", "").startswith("Bearer "):
            given = request.headers["authorization"][len("Bearer "):]
        return given is not None and hmac.compare_digest(given.encode(), settings.api_key.encode())

    unauthorized = (401, "missing or wrong API key: send it in the X-API-Key header")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise BadInput(413, f"the body has {int(declared):,} bytes, more than this server's limit of "
                                 f"{settings.max_body_bytes:,}; send fewer examples per request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise BadInput(413, f"the body is more than this server's limit of {settings.max_body_bytes:,} "
                                     f"bytes; send fewer examples per request")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post(ROUTES["predict"])
    async def predict(request: Request) -> Any:
        if not authorized(request):
            return error(*unauthorized)
        try:
            x = parse_inputs(await read_body(request), server.model, settings)
        except BadInput as bad:
            return error(bad.status, bad.detail)
        try:
            return await server.predict(x)
        except Exception as exc:  # not the client's fault
            log.exception("prediction failed")
            return error(500 if not isinstance(exc, RuntimeError) else 503,
                         f"prediction failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")

    @app.get(ROUTES["ready"])
    async def ready() -> Any:
        ok = server.batcher.running
        body = {"status": "ready" if ok else "starting", "model": server.model.name,
                "version": server.model.version, "last_load_error": server.last_error}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get(ROUTES["live"])
    async def live() -> Any:
        return {"status": "alive"}

    @app.get(ROUTES["model"])
    async def model_info(request: Request) -> Any:
        if not authorized(request):
            return error(*unauthorized)
        return {**server.model.info(), "source": source.describe(), "last_load_error": server.last_error,
                "settings": settings.to_dict()}

    @app.post(ROUTES["reload"])
    async def reload(request: Request) -> Any:
        if not authorized(request):
            return error(*unauthorized)
        try:
            return await server.reload()
        except WorkbenchError as exc:
            return error(409, str(exc))

    @app.get(ROUTES["metrics"])
    async def metrics() -> Any:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_MetricsMiddleware, metrics=server.metrics)
    return app


def run_server(app: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "warning",
               banner: str | None = None) -> None:
    """Serve `app` with uvicorn until SIGINT/SIGTERM (in-flight requests finish first); print `banner` once the
    port is known to be free."""
    import socket

    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise WorkbenchError(f"port must be in 1..65535, got {port!r}")
    # uvicorn answers a busy port with a log line and sys.exit(1); check first for a clear error.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise WorkbenchError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") \
                from None
    if banner:
        print(banner, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=10)
    # The process holds millions of long-lived objects (torch, MLflow, ...): a full garbage collection
    # walks them all and stalls every request in flight for 100+ ms. Freezing them keeps the collector
    # to what requests allocate.
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run()

"""The inference server: FastAPI over ONNX Runtime, with dynamic batching, Prometheus metrics and hot swaps.

Routes (the Dockerfile, the Kubernetes manifests and the Prometheus config use exactly these):

* ``POST /predict``       ``{"inputs": [example, ...]}`` -> ``{"model", "version", "predictions", "probabilities"}``;
  every bad input is a 4xx with a one-line ``detail``, never a 500.
* ``GET /health``         readiness: 200 when a model is loaded and the batcher runs, else 503; says whether the
  last load failed (``last_load``), never naming a file.
* ``GET /health/live``    liveness: 200 while the process answers.
* ``GET /model``          name, version, recipe, sha256, input shape, source; the last load.
* ``GET /metrics``        Prometheus text format.
* ``POST /admin/reload``  look up the alias now and swap if it moved (the server also polls).
* ``GET /openapi.json``   the schema: the request body and every status each route can answer.

With an API key set, ``/predict``, ``/model`` and ``/admin/reload`` need it (``X-API-Key`` or ``Authorization:
Bearer``); ``workbench serve`` refuses to listen beyond loopback without one. A request's headers, then its body,
must each arrive within ``body_timeout_s`` (else 408 and the connection is closed).

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
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from ..errors import WorkbenchError
from . import DEFAULT_HOST, DEFAULT_PORT
from .batching import BatchInfo, DynamicBatcher
from .models import FileSource, LoadedModel, ModelSource, RegistrySource
from .validate import BadInput, check_content_type, parse_inputs

__all__ = ["ServeSettings", "LoadedModel", "RegistrySource", "FileSource", "parse_inputs", "create_app",
           "run_server", "uvicorn_config", "DEFAULT_HOST", "DEFAULT_PORT", "ROUTES", "METRIC_NAMES"]

log = logging.getLogger("workbench.serve")

ROUTES = {"predict": "/predict", "ready": "/health", "live": "/health/live", "model": "/model",
          "metrics": "/metrics", "reload": "/admin/reload"}
METRIC_NAMES = ("workbench_http_requests_total", "workbench_http_request_duration_seconds", "workbench_batch_size",
                "workbench_batch_run_seconds", "workbench_model_version", "workbench_model_info",
                "workbench_predictions_total", "workbench_reference_class_share",
                "workbench_model_load_failures_total", "workbench_model_swaps_total", "workbench_queue_depth")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# nginx's "client closed request": the client hung up before the answer. Not a 5xx, so the error-rate alert
# (status=~"5..") ignores it; still counted, so a wave of hang-ups shows on the dashboard.
CLIENT_CLOSED = 499


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
        body_timeout_s: longest wait for a request's headers, then for its body (more is a 408 and the
            connection is closed): half-sent requests cannot hold connections open.
    """

    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_rows: int = 256
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    poll_seconds: float = 5.0
    threads: int = 1
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_rows", "max_body_bytes", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkbenchError(f"ServeSettings.{name} must be a whole number >= 1, got {value!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise WorkbenchError(f"ServeSettings.max_wait_ms must be in [0, 1000], got {self.max_wait_ms!r}")
        if not self.poll_seconds >= 0:
            raise WorkbenchError(f"ServeSettings.poll_seconds must be >= 0 (0: no polling), got {self.poll_seconds!r}")
        if isinstance(self.body_timeout_s, bool) or not isinstance(self.body_timeout_s, (int, float)) \
                or not 0 < self.body_timeout_s <= 3600:
            raise WorkbenchError(f"ServeSettings.body_timeout_s must be seconds in (0, 3600], got "
                                 f"{self.body_timeout_s!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise WorkbenchError("an API key must be at least 8 characters long")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = bool(self.api_key)  # never echo the key
        return d


# -- what the routes answer, for the OpenAPI schema (the handlers build the JSON themselves, unvalidated: fast) --
class ErrorBody(BaseModel):
    """Every 4xx and 5xx but /health's 503."""

    detail: str = Field(description="what was wrong and what was expected, on one line")


class PredictResponse(BaseModel):
    model: str
    version: int | str
    predictions: list[int] = Field(description="the predicted class of each example")
    probabilities: list[list[float]] = Field(description="softmax of the logits, one row per example")


class LastLoad(BaseModel):
    """The outcome of the last attempt to load the model the source points at."""

    ok: bool
    error: str | None = Field(description="why it failed (one line, no file paths); null when ok")
    at: str = Field(description="when, ISO 8601 UTC")


class Health(BaseModel):
    status: Literal["ready", "starting"]
    model: str
    version: int | str
    last_load: LastLoad


class Live(BaseModel):
    status: Literal["alive"]


class ModelInfo(BaseModel):
    name: str
    version: int | str
    sha256: str
    recipe: dict[str, Any]
    input_shape: list[int]
    num_classes: int
    description: str
    path: str
    loaded_at: str
    source: str
    last_load: LastLoad
    settings: dict[str, Any]


class ReloadResult(BaseModel):
    swapped: bool
    version: int | str
    previous: int | str | None = Field(None, description="the version served before, when swapped")


_ERRORS = {400: "malformed JSON, or nested too deeply", 401: "missing or wrong API key",
           408: "the body did not arrive within the body timeout (the connection is closed)",
           409: "the new version failed to load; the old one is still served",
           413: "the body or the batch is over this server's limits",
           415: "the body is not declared as application/json",
           422: "valid JSON, wrong content: not {\"inputs\": [...]}, a wrong shape, not finite numbers, an empty "
                "batch, inputs on which the model's outputs overflow",
           503: "the batcher is not running (starting or stopping)"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _ERRORS[code]} for code in codes}


def _predict_body(shape: tuple[int, ...], max_rows: int) -> dict[str, Any]:
    """The OpenAPI requestBody of /predict for a model taking examples of `shape` (nested, or flat)."""
    number: dict[str, Any] = {"type": "number", "minimum": -_FLOAT32_MAX, "maximum": _FLOAT32_MAX}

    def nested(dims: tuple[int, ...]) -> dict[str, Any]:
        schema = number
        for d in reversed(dims):
            schema = {"type": "array", "items": schema, "minItems": d, "maxItems": d}
        return schema

    def batch(example: dict[str, Any]) -> dict[str, Any]:
        return {"type": "array", "minItems": 1, "maxItems": max_rows, "items": example}

    flat = (math.prod(shape),)
    inputs = batch(nested(shape)) if len(shape) == 1 else {"anyOf": [batch(nested(shape)), batch(nested(flat))]}
    inputs["description"] = (f"1 to {max_rows} examples, all of shape {list(shape)} or all flat lists of "
                             f"{flat[0]} numbers")
    schema = {"type": "object", "required": ["inputs"], "additionalProperties": False,
              "properties": {"inputs": inputs}}
    return {"required": True, "content": {"application/json": {
        "schema": schema, "example": {"inputs": [np.zeros(flat).tolist()]}}}}


# Absolute paths and URIs, in messages that leave the process through an open route.
_URI = re.compile(r"\b([a-zA-Z][\w+.-]*)://[^\s'\"(),;]*")
_PATH = re.compile(r"(?<![\w.~:/-])(?:[a-zA-Z]:\\|~?/)[^\s'\"(),;]+")


def _scrub_paths(message: str) -> str:
    """`message` without file paths or URIs: ``/srv/models/v3/model.onnx`` becomes ``.../model.onnx``."""
    message = _URI.sub(lambda m: f"{m.group(1)}://...", message)
    return _PATH.sub(lambda m: ".../" + re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1], message)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


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
        self.last_load: dict[str, Any] = {"ok": True, "error": None, "at": _utc(self.model.loaded_at)}
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
        from .lifecycle import Poller

        poller = Poller(self.source, self.reload)
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            await poller.step()  # never raises; a version that fails to load is tried once and logged once

    async def reload(self) -> dict[str, Any]:
        """Swap to the version the source points at now, if it moved. The old model serves until then."""
        async with self._swap_lock:
            old = self.model
            try:
                target = await asyncio.to_thread(self.source.current)
                if target == str(old.version) or target == old.sha256:
                    if not self.last_load["ok"]:  # the alias points at what is served again
                        self.last_load = {"ok": True, "error": None, "at": _utc(time.time())}
                    return {"swapped": False, "version": old.version}
                new = await asyncio.to_thread(self.source.load, self.settings.threads)
            except Exception as exc:
                self.metrics.load_failures.inc()
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.error("model reload failed, still serving %s/%s: %s", old.name, old.version, msg)  # full text
                msg = _scrub_paths(msg)[:300]  # what clients see names no file
                self.last_load = {"ok": False, "error": msg, "at": _utc(time.time())}
                raise WorkbenchError(f"could not load the new model ({msg}); still serving "
                                     f"{old.name}/{old.version}") from None
            self.model = new  # one reference: batches formed from now on use the new model
            self.last_load = {"ok": True, "error": None, "at": _utc(new.loaded_at)}
            self.metrics.set_model(new)
            self.metrics.swaps.inc()
            log.warning("swapped %s/%s -> %s/%s", old.name, old.version, new.name, new.version)
            return {"swapped": True, "version": new.version, "previous": old.version}

    async def predict(self, x: np.ndarray) -> dict[str, Any]:
        """Classify `x`; raise a 422 :class:`BadInput` if the model's outputs overflow on it."""
        logits, model = await self.batcher.submit(x)
        bad = ~np.isfinite(logits).all(axis=1)
        if bad.any():  # e.g. inputs near float32's limit: the float32 arithmetic overflows to inf, then NaN
            raise BadInput(422, f"example {int(np.argmax(bad))} drives the model's outputs to infinity or NaN; "
                                f"send inputs in the range the model was trained on")
        logits = logits.astype(np.float64)  # differences of finite float32 logits can overflow float32
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

    def __init__(self, app: Any, metrics: _Metrics, extra_routes: tuple[str, ...] = ()) -> None:
        self.app, self.metrics = app, metrics
        self.known = set(ROUTES.values()) | set(extra_routes)

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
        except ClientDisconnect:
            # The client hung up while sending its body: nobody is left to answer, and it is not the server's
            # fault. Counted as 499 (see CLIENT_CLOSED), not as the 500 an escaping exception would be.
            status["code"] = CLIENT_CLOSED
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class _BodyTimeout(Exception):
    """Raised from `receive` when the body is late; turned into a 408 by :class:`_BodyTimeoutMiddleware`."""


class _BodyTimeoutMiddleware:
    """Bounds the wait for a request body, and closes connections whose body was left unread.

    uvicorn has no such timeout: without it a client that sends headers and half a body holds a connection and a
    task for as long as it likes. Every route that reads the body gets a 408 when the whole body has not arrived
    `timeout_s` after the headers; a route that answers without reading it (401, 413, ...) closes the
    connection, so the unread rest cannot trickle in forever either.
    """

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        has_body = headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers
        state = {"body_done": not has_body, "started": False}
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def timed_receive() -> dict:
            if state["body_done"]:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["body_done"]:  # answered before the body was read: do not wait for the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, timed_receive, send_closing)
        except _BodyTimeout:
            if state["started"]:
                return  # the answer is under way (uvicorn closes the connection of an unfinished one)
            detail = (f"the request body did not arrive within {self.timeout_s:g} s; send the whole body at once "
                      f"(the server's limit is --body-timeout-s / WORKBENCH_BODY_TIMEOUT_S)")
            body = json.dumps({"detail": detail}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 408, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def key_guard(api_key: str | None) -> list[Any]:
    """The route dependencies that require `api_key` (none without one).

    The key is checked by a dependency, so that the schema declares it (securitySchemes) on the routes
    that need it; it is accepted in the X-API-Key header or as a bearer token, compared in constant time.
    """
    if not api_key:
        return []
    from fastapi import Depends, HTTPException, Security
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="this server's API key")
    bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")

    async def require_key(key: str | None = Security(key_header),
                          token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = key if key is not None else (token.credentials if token is not None else None)
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")

    return [Depends(require_key)]


def create_app(source: ModelSource | str | os.PathLike, settings: ServeSettings | None = None, *,
               registry: Any = None, generator: Any = None) -> Any:
    """Build the FastAPI app; the model is loaded now (an error here means there is nothing to serve).

    Args:
        source: a :class:`RegistrySource`/:class:`FileSource`, a reference ``NAME@ALIAS`` / ``NAME/VERSION``,
            or the path of an ``.onnx`` file.
        settings: batching, limits, API key, polling, body timeout.
        registry: the :class:`~workbench.serve.registry.Registry` to resolve a reference in (default one).
        generator: a :class:`~workbench.serve.generate.GenerationEngine` (a GPT): adds ``POST /generate``,
            behind the same API key, its metrics in the same registry, started and stopped with the app.

    Example:
        >>> app = create_app("digits-mlp@champion", ServeSettings(max_batch=32))
        >>> run_server(app, host="127.0.0.1", port=8000)
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    settings = settings or ServeSettings()
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        source = FileSource(text) if text.endswith(".onnx") else RegistrySource(text, registry=registry)
    server = ModelServer(source, settings)
    if generator is not None:
        generator.use_registry(server.metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        await server.start()
        if generator is not None:
            await generator.start()
        try:
            yield
        finally:
            if generator is not None:
                await generator.stop()
            await server.stop()

    app = FastAPI(title="workbench model server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    guarded = key_guard(settings.api_key)
    auth = (401,) if settings.api_key else ()

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

    @app.post(ROUTES["predict"], dependencies=guarded, response_model=PredictResponse,
              responses=_errors(400, *auth, 408, 413, 415, 422, 503),
              summary="Predict the classes of a batch of examples")
    async def predict(request: Request) -> Any:
        try:
            check_content_type(request.headers.get("content-type"))
            x = parse_inputs(await read_body(request), server.model, settings)
        except BadInput as bad:
            return error(bad.status, bad.detail)
        try:
            return JSONResponse(await server.predict(x))
        except BadInput as bad:
            return error(bad.status, bad.detail)
        except Exception as exc:  # not the client's fault
            log.exception("prediction failed")
            return error(500 if not isinstance(exc, RuntimeError) else 503,
                         f"prediction failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")

    @app.get(ROUTES["ready"], response_model=Health,
             responses={503: {"model": Health, "description": "not ready: the batcher is not running"}},
             summary="Readiness probe")
    async def ready() -> Any:
        ok = server.batcher.running
        body = {"status": "ready" if ok else "starting", "model": server.model.name,
                "version": server.model.version, "last_load": server.last_load}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get(ROUTES["live"], response_model=Live, summary="Liveness probe")
    async def live() -> Any:
        return JSONResponse({"status": "alive"})

    @app.get(ROUTES["model"], dependencies=guarded, response_model=ModelInfo, responses=_errors(*auth),
             summary="What is served")
    async def model_info() -> Any:
        return JSONResponse({**server.model.info(), "source": source.describe(), "last_load": server.last_load,
                             "settings": settings.to_dict()})

    @app.post(ROUTES["reload"], dependencies=guarded, response_model=ReloadResult, responses=_errors(*auth, 409),
              summary="Swap to the version the alias points at now")
    async def reload() -> Any:
        try:
            return JSONResponse(await server.reload())
        except WorkbenchError as exc:
            return error(409, str(exc))

    @app.get(ROUTES["metrics"], response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics() -> Any:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        # The body /predict takes depends on the model served, which a hot swap may change.
        shape = tuple(server.model.input_shape)
        if app.openapi_schema is None or getattr(app.state, "openapi_shape", None) != shape:
            app.openapi_schema = None
            schema = FastAPI.openapi(app)
            schema["paths"][ROUTES["predict"]]["post"]["requestBody"] = _predict_body(shape, settings.max_rows)
            app.state.openapi_shape = shape
        return app.openapi_schema

    app.openapi = openapi
    extra_routes: tuple[str, ...] = ()
    if generator is not None:  # POST /generate beside /predict (a method: generate.py imports this module)
        extra_routes = (generator.mount(app, dependencies=guarded, auth=bool(settings.api_key)),)
    app.add_middleware(_BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(_MetricsMiddleware, metrics=server.metrics,  # added last: outermost, sees the 408s too
                       extra_routes=extra_routes)
    return app


def _guarded_protocol(timeout_s: float) -> Any:
    """uvicorn's httptools protocol, plus a deadline for a request's headers (uvicorn has none).

    Without it a client that connects and sends nothing, or headers a byte at a time, holds a connection for
    ever: uvicorn's keep-alive timer runs only between requests and any byte resets it. The deadline runs from the
    connection (or the end of the previous answer) to the end of the headers; past it the connection is closed,
    with a 408 if part of a request had arrived (an idle connection is closed silently, as uvicorn's keep-alive
    timeout does, so that a client never reads a 408 it did not ask for). These are uvicorn internals: without
    httptools, plain "auto" (no header deadline).
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed
        return "auto"

    detail = json.dumps({"detail": f"the request headers did not arrive within {timeout_s:g} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: " + str(len(detail)).encode() + b"\r\n\r\n" + detail)

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_started = False  # some bytes of the next request have arrived

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():  # armed only while no request is in flight: nothing else writes
                if self._head_started:
                    self.transport.write(answer)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            self._head_started = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._head_started = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is None or self.cycle.response_complete:  # no pipelined request already under way
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                   log_level: str = "warning") -> Any:
    """The ``uvicorn.Config`` the server runs with: header and body deadlines, keep-alive, graceful shutdown."""
    import uvicorn

    timeout_s = app.state.server.settings.body_timeout_s
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=_guarded_protocol(timeout_s),
                          timeout_keep_alive=5,  # idle keep-alive connections close after 5 s (uvicorn's default)
                          timeout_graceful_shutdown=10)


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
    config = uvicorn_config(app, host=host, port=port, log_level=log_level)
    # The process holds millions of long-lived objects (torch, MLflow, ...): a full garbage collection
    # walks them all and stalls every request in flight for 100+ ms. Freezing them keeps the collector
    # to what requests allocate.
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run()

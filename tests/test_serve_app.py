"""The FastAPI server in process: predictions match ONNX Runtime, every bad input is a clear 4xx, metrics, swaps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from test_serve_common import NAME, fresh_registry, results

from workbench import data
from workbench import onnx as wonnx
from workbench.errors import WorkbenchError
from workbench.serve.app import METRIC_NAMES, ROUTES, ServeSettings, create_app
from workbench.serve.batching import DynamicBatcher
from workbench.serve.monitor import bucket_quantile

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

KEY = "test-key-123"


def client_for(app):
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture()
def file_app():
    return create_app(results()[0].onnx_path, ServeSettings(api_key=KEY, poll_seconds=0, max_rows=64,
                                                            max_body_bytes=200_000))


def test_predictions_match_onnx_runtime(file_app, digits):
    X = digits.X_test[:20]
    ref = wonnx.run_session(wonnx.session(results()[0].onnx_path), X)
    with client_for(file_app) as c:
        r = c.post(ROUTES["predict"], json={"inputs": X.tolist()}, headers={"X-API-Key": KEY})
        flat = c.post(ROUTES["predict"], json={"inputs": X.reshape(20, -1).tolist()}, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"] == ref.argmax(1).tolist()
    assert np.allclose(np.array(body["probabilities"]).sum(1), 1.0, atol=1e-4)
    assert flat.json()["predictions"] == body["predictions"]  # flat rows of 64 numbers are accepted too


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


ROW = [0.0] * 64
BAD_INPUTS = {
    "malformed JSON": (b'{"inputs": [[0, 1', 400, "not valid JSON"),
    "not an object": (_body([ROW]), 422, 'expected a JSON object {"inputs"'),
    "unknown field": (_body({"inputs": [ROW], "extra": 1}), 422, "unknown field"),
    "inputs not a list": (_body({"inputs": "abc"}), 422, "must be a list of examples"),
    "empty batch": (_body({"inputs": []}), 422, "empty batch"),
    "wrong shape": (_body({"inputs": [[1.0, 2.0, 3.0]]}), 422, "each example must have shape [1, 8, 8]"),
    "ragged": (_body({"inputs": [ROW, ROW[:10]]}), 422, "rectangular array"),
    "strings": (_body({"inputs": [["a"] * 64]}), 422, "only numbers, got strings"),
    "booleans": (_body({"inputs": [[True] * 64]}), 422, "only numbers, got true/false"),
    "nulls": (_body({"inputs": [[None] * 64]}), 422, "only numbers"),
    "booleans among numbers": (_body({"inputs": [[True] + [0.5] * 63]}), 422, "got true/false among them"),
    "integer beyond float64": (b'{"inputs": [[1' + b"0" * 400 + b", 0" * 63 + b"]]}", 422, "finite float32"),
    "NaN": (b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}", 422, "finite numbers; the body contains NaN"),
    "Infinity": (b'{"inputs": [[-Infinity' + b", 0" * 63 + b"]]}", 422, "contains -Infinity"),
    "beyond float32": (_body({"inputs": [[1e39] + [0] * 63]}), 422, "finite float32"),
    # Finite float32, but the model's float32 arithmetic overflows (found by the fuzz test: it was a 500).
    "overflowing the model": (_body({"inputs": [ROW, [3e38] * 64]}), 422, "example 1 drives the model's outputs"),
    "too many rows": (_body({"inputs": [ROW] * 65}), 413, "more than this server's limit of 64"),
    "oversized body": (_body({"inputs": [ROW] * 3000}), 413, "more than this server's limit of 200,000"),
    # ~2 KB that exhausts the JSON parser's recursion limit (it used to be a 500 that dropped the connection).
    "nested 1,000 deep": (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "nested too deeply"),
    "nested 50,000 deep": (b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "nested too deeply"),
    "objects nested 1,000 deep": (b'{"inputs": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001, 400, "nested too deeply"),
    "nested 500 deep": (b'{"inputs": ' + b"[" * 500 + b"0" + b"]" * 500 + b"}", 422, "rectangular array"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_4xx_never_a_500(file_app, case):
    body, status, message = BAD_INPUTS[case]
    with client_for(file_app) as c:
        r = c.post(ROUTES["predict"], content=body, headers={"X-API-Key": KEY, "Content-Type": "application/json"})
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and message in detail and "\n" not in detail
        assert c.get(ROUTES["ready"]).status_code == 200  # and the server is fine afterwards


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_a_body_that_is_not_json_is_415(file_app, content_type):
    with client_for(file_app) as c:
        r = c.post(ROUTES["predict"], content=_body({"inputs": [ROW]}),
                   headers={"X-API-Key": KEY, "Content-Type": content_type})
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"]
        for ok_type in ("application/json", "application/json; charset=utf-8", None):
            headers = {"X-API-Key": KEY} | ({"Content-Type": ok_type} if ok_type else {})
            assert c.post(ROUTES["predict"], content=_body({"inputs": [ROW]}), headers=headers).status_code == 200


def test_integers_beyond_int64_are_numbers(file_app):
    # JSON has no integer limit; numpy keeps such values as Python objects unless told they are numbers.
    with client_for(file_app) as c:
        r = c.post(ROUTES["predict"], json={"inputs": [[-(2**63) - 1] + [0] * 63]}, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text


def test_oversized_body_without_content_length_is_refused(file_app):
    def chunks():
        for _ in range(40):
            yield b" " * 10_000  # 400 kB of whitespace, streamed (chunked, no Content-Length)

    with client_for(file_app) as c:
        r = c.post(ROUTES["predict"], content=chunks(), headers={"X-API-Key": KEY})
    assert r.status_code == 413 and "200,000" in r.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-000"}, {"Authorization": "Bearer nope"}])
def test_missing_or_wrong_api_key_is_401(file_app, headers):
    with client_for(file_app) as c:
        for method, route in (("post", "predict"), ("get", "model"), ("post", "reload")):
            r = c.request(method.upper(), ROUTES[route], json={"inputs": [ROW]}, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert c.get(ROUTES["ready"]).status_code == 200  # probes and metrics stay open
        assert c.get(ROUTES["metrics"]).status_code == 200
        ok = c.post(ROUTES["predict"], json={"inputs": [ROW]}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_health_model_and_metrics(file_app, digits):
    with client_for(file_app) as c:
        assert c.get(ROUTES["live"]).json() == {"status": "alive"}
        ready = c.get(ROUTES["ready"]).json()
        assert ready["status"] == "ready" and ready["last_load"]["ok"] is True and ready["last_load"]["error"] is None
        info = c.get(ROUTES["model"], headers={"X-API-Key": KEY}).json()
        assert info["input_shape"] == [1, 8, 8] and info["num_classes"] == 10
        assert info["settings"]["api_key"] is True  # said to be set, never shown
        for _ in range(3):
            c.post(ROUTES["predict"], json={"inputs": digits.X_test[:4].tolist()}, headers={"X-API-Key": KEY})
        c.post(ROUTES["predict"], content=b"{", headers={"X-API-Key": KEY})
        text = c.get(ROUTES["metrics"]).text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        assert name.removesuffix("_total") in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("workbench_http_requests_total", (("route", "/predict"), ("status", "200")))] == 3
    assert samples[("workbench_http_requests_total", (("route", "/predict"), ("status", "400")))] == 1
    assert sum(v for (n, _), v in samples.items() if n == "workbench_predictions_total") == 12
    assert samples[("workbench_batch_size_count", ())] >= 1
    assert samples[("workbench_batch_size_sum", ())] == 12


def test_swap_on_reload_and_a_failed_load_keeps_the_old_model(tmp_path, digits):
    good, weak = results()
    reg = fresh_registry(tmp_path / "registry")
    v1 = reg.register_result(good, name=NAME, alias=None)
    reg.promote(NAME, v1.version)
    v2 = reg.register_result(weak, name=NAME)
    v3 = reg.register_result(good, name=NAME)
    app = create_app(f"{NAME}@champion", ServeSettings(poll_seconds=0), registry=reg)
    x = {"inputs": digits.X_test[:2].tolist()}
    with client_for(app) as c:
        assert c.post(ROUTES["predict"], json=x).json()["version"] == 1
        assert c.post(ROUTES["reload"]).json() == {"swapped": False, "version": 1}
        reg.promote(NAME, v2.version)
        assert c.post(ROUTES["reload"]).json() == {"swapped": True, "version": 2, "previous": 1}
        assert c.post(ROUTES["predict"], json=x).json()["version"] == 2
        # Version 3's file is damaged after it was promoted: the server refuses it and keeps version 2.
        reg.promote(NAME, v3.version)
        path = reg.local_path(v3)
        path.write_bytes(path.read_bytes()[:-100])
        r = c.post(ROUTES["reload"])
        assert r.status_code == 409
        assert "changed after registration" in r.json()["detail"] and "still serving digits-mlp/2" in r.json()["detail"]
        assert c.post(ROUTES["predict"], json=x).json()["version"] == 2
        health = c.get(ROUTES["ready"]).json()
        assert health["status"] == "ready" and health["last_load"]["ok"] is False
        assert "changed after registration" in health["last_load"]["error"]
        assert str(tmp_path) not in json.dumps(health)  # /health is open: it names no file
        assert "workbench_model_load_failures_total 1.0" in c.get(ROUTES["metrics"]).text
        assert 'workbench_model_version{name="digits-mlp"} 2.0' in c.get(ROUTES["metrics"]).text
        # Rolling back points the alias at what is served: nothing to swap, the error is cleared.
        assert reg.rollback(NAME).version == 2
        assert c.post(ROUTES["reload"]).json() == {"swapped": False, "version": 2}
        assert c.get(ROUTES["ready"]).json()["last_load"]["ok"] is True


def _dynamic_shape_model(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "features"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "features"])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what this onnxruntime reads
    onnx.save(model, str(path))


def test_a_new_file_that_fails_to_load_keeps_the_old_model(tmp_path, digits):
    import shutil

    path = tmp_path / "served.onnx"
    shutil.copyfile(results()[0].onnx_path, path)
    app = create_app(path, ServeSettings(poll_seconds=0))
    x = {"inputs": digits.X_test[:2].tolist()}
    with client_for(app) as c:
        before = c.post(ROUTES["predict"], json=x).json()
        _dynamic_shape_model(path)  # a valid ONNX file the server cannot serve (no fixed input shape)
        r = c.post(ROUTES["reload"])
        assert r.status_code == 409 and "input shape" in r.json()["detail"] and "still serving" in r.json()["detail"]
        assert c.post(ROUTES["predict"], json=x).json() == before
        path.write_bytes(b"garbage")  # not ONNX at all
        assert "could not load" in c.post(ROUTES["reload"]).json()["detail"]
        assert c.post(ROUTES["predict"], json=x).json() == before
        health = c.get(ROUTES["ready"])
        assert health.status_code == 200 and set(health.json()["last_load"]) == {"ok", "error", "at"}
        last = health.json()["last_load"]
        assert last["ok"] is False and last["error"] and time.strptime(last["at"], "%Y-%m-%dT%H:%M:%SZ")
        # ONNX Runtime's message names the file; /health (open to anyone who can reach the port) must not.
        assert str(tmp_path) not in health.text and "/tmp" not in health.text
        assert "workbench_model_load_failures_total 2.0" in c.get(ROUTES["metrics"]).text


def test_a_model_that_fails_to_load_at_start_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(WorkbenchError, match="broken.onnx"):
        create_app(bad)
    with pytest.raises(WorkbenchError, match="does not exist"):
        create_app(tmp_path / "missing.onnx")
    with pytest.raises(WorkbenchError, match="at least 8 characters"):
        ServeSettings(api_key="short")
    with pytest.raises(WorkbenchError, match="max_batch"):
        ServeSettings(max_batch=0)


# -- faults an attacker found ----------------------------------------------------------------------------
def _asgi_call(app, scope_extra: dict, messages: list[dict]) -> list[dict]:
    """Run one HTTP request through the ASGI app with these `receive` messages; return what it sent."""
    sent, pending = [], list(messages)

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": ROUTES["predict"], "raw_path": ROUTES["predict"].encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"x-api-key", KEY.encode()), (b"content-type", b"application/json"),
                         (b"content-length", b"4000")], **scope_extra}
    asyncio.run(app(scope, receive, send))
    return sent


def _status_counts(text: str) -> dict[tuple[str, str], float]:
    """workbench_http_requests_total by (route, status), from the /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.labels["route"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
            if f.name == "workbench_http_requests" for s in f.samples if s.name.endswith("_total")}


def test_a_client_that_disconnects_mid_body_is_not_a_server_error(file_app):
    # Half a body, then the client goes away: nobody is there to answer, and it is not the server's fault.
    sent = _asgi_call(file_app, {}, [{"type": "http.request", "body": b'{"inputs": [[0, 1', "more_body": True},
                                     {"type": "http.disconnect"}])
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] in ([], [499])
    with client_for(file_app) as c:
        counts = _status_counts(c.get(ROUTES["metrics"]).text)
    assert counts.get(("/predict", "499")) == 1
    assert not [k for k in counts if k[1].startswith("5")], counts


@contextlib.contextmanager
def live_server(app):
    """`app` served by uvicorn on a free loopback port in a thread, configured as `workbench serve` does."""
    import uvicorn

    from workbench.serve.app import uvicorn_config
    from workbench.serve.process import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)


def _read_response(sock) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from `sock` (raises socket.timeout if none comes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest[:length]


def _closed(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture()
def slow_app():
    return create_app(results()[0].onnx_path, ServeSettings(api_key=KEY, poll_seconds=0, body_timeout_s=0.5))


def test_half_sent_bodies_get_408_and_the_connection_is_closed(slow_app):
    head = (f"POST {ROUTES['predict']} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n").encode()
    with live_server(slow_app) as port:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        started = time.monotonic()
        for s in socks:
            s.sendall(head + b'{"inputs": [[0, 1, 2')  # ... and the other 1,980 bytes never come
        for s in socks:
            status, headers, body = _read_response(s)
            assert status == 408 and headers["connection"] == "close"
            assert "0.5 s" in json.loads(body)["detail"] and _closed(s)
            s.close()
        assert time.monotonic() - started < 4.0  # the body timeout of 0.5 s, not the client's patience
        counts = _status_counts(httpx.get(f"http://127.0.0.1:{port}{ROUTES['metrics']}").text)
    assert counts[("/predict", "408")] == 20


def test_half_sent_headers_get_408_and_an_idle_connection_is_closed(slow_app):
    with live_server(slow_app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as half, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            started = time.monotonic()
            half.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Ap")  # ... and no more
            status, headers, _ = _read_response(half)
            assert status == 408 and headers["connection"] == "close" and _closed(half)
            assert _closed(idle)  # no request, nothing to answer: closed without a word
            assert time.monotonic() - started < 4.0
            # A keep-alive connection idle after an answer is closed too, without an unasked-for 408.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
                kept.sendall(f"GET {ROUTES['live']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert _read_response(kept)[0] == 200 and _closed(kept)


def test_a_deeply_nested_body_keeps_the_connection_alive(slow_app):
    body = b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    with live_server(slow_app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall((f"POST {ROUTES['predict']} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
            status, headers, data = _read_response(s)
            assert status == 400 and "nested too deeply" in json.loads(data)["detail"]
            assert headers.get("connection") != "close"
            s.sendall(f"GET {ROUTES['live']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # same connection
            assert _read_response(s)[0] == 200


# Every status each route can answer (with the API key set); 5xx only where the server itself is at fault.
DOCUMENTED = {("post", "predict"): {"200", "400", "401", "408", "413", "415", "422", "503"},
              ("get", "ready"): {"200", "503"}, ("get", "live"): {"200"}, ("get", "model"): {"200", "401"},
              ("get", "metrics"): {"200"}, ("post", "reload"): {"200", "401", "409"}}


def test_openapi_documents_the_request_body_and_every_error(file_app):
    with client_for(file_app) as c:
        schema = c.get("/openapi.json").json()
    ops = {(method, name): schema["paths"][ROUTES[name]][method] for method, name in DOCUMENTED}
    for key, codes in DOCUMENTED.items():
        assert set(ops[key]["responses"]) == codes, key
        for code, response in ops[key]["responses"].items():
            (media,) = response["content"]
            ref = response["content"][media]["schema"].get("$ref", "")
            if code >= "400" and key != ("get", "ready"):
                assert ref == "#/components/schemas/ErrorBody", (key, code)
            elif media == "application/json":
                assert ref.startswith("#/components/schemas/"), (key, code)
    body = ops["post", "predict"]["requestBody"]
    assert body["required"] is True
    batches = body["content"]["application/json"]["schema"]["properties"]["inputs"]["anyOf"]
    assert [(b["minItems"], b["maxItems"]) for b in batches] == [(1, 64)] * 2  # this server's max_rows
    assert [b["items"]["minItems"] for b in batches] == [1, 64]  # all (1, 8, 8) nested, or all 64 numbers flat
    secured = {key for key, op in ops.items() if op.get("security")}
    assert secured == {("post", "predict"), ("get", "model"), ("post", "reload")}
    assert {"APIKeyHeader", "HTTPBearer"} <= set(schema["components"]["securitySchemes"])


# -- the batcher on its own -------------------------------------------------------------------------------
def _gather(batcher, inputs):
    async def go():
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(x) for x in inputs), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(go())


def test_batcher_groups_concurrent_requests_and_splits_results_back():
    calls = []

    def run(model, x):
        calls.append(len(x))
        return x * model

    b = DynamicBatcher(run, lambda: 10, max_batch=8, max_wait_ms=50)
    inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(10)]  # 19 rows in requests of 1-3 rows
    out = _gather(b, inputs)
    for i, (y, model) in enumerate(out):
        assert model == 10 and np.array_equal(y, inputs[i] * 10)
    assert sum(calls) == 19 and max(calls) <= 8 and len(calls) <= 4  # batched, never over max_batch


def test_batcher_without_batching_and_with_large_requests():
    calls = []
    b = DynamicBatcher(lambda m, x: calls.append(len(x)) or x, lambda: None, max_batch=1, max_wait_ms=0)
    _gather(b, [np.zeros((1, 2))] * 4 + [np.zeros((5, 2))])
    assert sorted(calls) == [1, 1, 1, 1, 5]  # one call per request; a large request runs alone


def test_batcher_failure_fails_only_its_batch():
    def run(model, x):
        if (x < 0).any():
            raise RuntimeError("boom")
        return x

    b = DynamicBatcher(run, lambda: None, max_batch=1, max_wait_ms=0)
    out = _gather(b, [np.ones((1, 1)), -np.ones((1, 1)), np.ones((1, 1))])
    assert isinstance(out[1], RuntimeError)
    assert out[0][0].tolist() == [[1.0]] and out[2][0].tolist() == [[1.0]]


def test_batch_formed_before_a_swap_finishes_on_the_old_model():
    import threading

    current = {"model": "old"}
    started, release = threading.Event(), threading.Event()

    def run(model, x):
        started.set()
        release.wait(5)
        return np.full((len(x), 1), 1.0 if model == "old" else 2.0)

    async def go():
        b = DynamicBatcher(run, lambda: current["model"], max_batch=4, max_wait_ms=0)
        await b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        await asyncio.to_thread(started.wait, 5)
        current["model"] = "new"  # the swap, while the first batch runs
        second = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        release.set()
        out = await asyncio.gather(first, second)
        await b.stop()
        return out

    (y1, m1), (y2, m2) = asyncio.run(go())
    assert (m1, float(y1[0, 0])) == ("old", 1.0) and (m2, float(y2[0, 0])) == ("new", 2.0)


@pytest.mark.parametrize("kwargs", [dict(max_batch=0), dict(max_batch=2.5), dict(max_wait_ms=-1)])
def test_batcher_settings_are_checked(kwargs):
    with pytest.raises(WorkbenchError):
        DynamicBatcher(lambda m, x: x, lambda: None, **kwargs)


def test_histogram_quantile_matches_prometheus_rule():
    edges = np.array([0.1, 0.2, 0.4, np.inf])
    cumulative = np.array([10.0, 50.0, 100.0, 100.0])
    # The 0.5 quantile is rank 50: the top of the (0.1, 0.2] bucket; 0.75 is half way into (0.2, 0.4].
    assert bucket_quantile(0.5, edges, cumulative) == pytest.approx(0.2)
    assert bucket_quantile(0.75, edges, cumulative) == pytest.approx(0.3)
    assert bucket_quantile(0.05, edges, cumulative) == pytest.approx(0.05)

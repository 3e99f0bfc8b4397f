"""The FastAPI server in process: predictions match ONNX Runtime, every bad input is a clear 4xx, metrics, swaps."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from test_serve_common import NAME, fresh_registry, results

from workbench import data
from workbench import onnx as wonnx
from workbench.errors import WorkbenchError
from workbench.serve.app import METRIC_NAMES, ROUTES, ServeSettings, create_app
from workbench.serve.batching import DynamicBatcher
from workbench.serve.monitor import _bucket_quantile

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
    "NaN": (b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}", 422, "finite numbers; the body contains NaN"),
    "Infinity": (b'{"inputs": [[-Infinity' + b", 0" * 63 + b"]]}", 422, "contains -Infinity"),
    "beyond float32": (_body({"inputs": [[1e39] + [0] * 63]}), 422, "finite float32"),
    "too many rows": (_body({"inputs": [ROW] * 65}), 413, "more than this server's limit of 64"),
    "oversized body": (_body({"inputs": [ROW] * 3000}), 413, "more than this server's limit of 200,000"),
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
        assert ready["status"] == "ready" and ready["last_load_error"] is None
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
        assert health["status"] == "ready" and "changed after registration" in health["last_load_error"]
        assert "workbench_model_load_failures_total 1.0" in c.get(ROUTES["metrics"]).text
        assert 'workbench_model_version{name="digits-mlp"} 2.0' in c.get(ROUTES["metrics"]).text
        # Rolling back points the alias at what is served: nothing to swap, the error is cleared.
        assert reg.rollback(NAME).version == 2
        assert c.post(ROUTES["reload"]).json() == {"swapped": False, "version": 2}
        assert c.get(ROUTES["ready"]).json()["last_load_error"] is None


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
    assert _bucket_quantile(0.5, edges, cumulative) == pytest.approx(0.2)
    assert _bucket_quantile(0.75, edges, cumulative) == pytest.approx(0.3)
    assert _bucket_quantile(0.05, edges, cumulative) == pytest.approx(0.05)

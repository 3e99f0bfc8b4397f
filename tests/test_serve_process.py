"""The server as a real process on 127.0.0.1: load generation, a hot swap under load, the `serve` command's errors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from test_serve_common import NAME, fresh_registry, results

from workbench import data
from workbench.errors import WorkbenchError
from workbench.serve import cli
from workbench.serve.app import ROUTES, ServeSettings
from workbench.serve.bench import swap_under_load
from workbench.serve.loadtest import closed_loop, open_loop, payloads_from
from workbench.serve.monitor import Scraper
from workbench.serve.process import ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_swap_under_load_fails_no_request(tmp_path):
    good, weak = results()
    reg = fresh_registry(tmp_path / "registry")
    v1 = reg.register_result(good, name=NAME, alias=None)
    reg.promote(NAME, v1.version)
    v2 = reg.register_result(weak, name=NAME)
    bodies = payloads_from(data.load("digits").X_test, rows=2, count=32)
    with ServerProcess(f"{NAME}@champion", registry_uri=reg.uri, settings=ServeSettings(poll_seconds=0.2)) as server:
        assert httpx.get(server.url + ROUTES["ready"]).json()["version"] == 1
        steady = open_loop(server.url + ROUTES["predict"], bodies, rate=100, duration_s=1.0)
        assert steady.errors == 0 and steady.requests == 100 and steady.versions == {"1": 100}
        # The alias moves while 8 clients keep sending; the server's poll picks it up (no reload call).
        with Scraper(server.url + ROUTES["metrics"], interval=0.2) as scraper:  # what Prometheus would see
            during, _ = swap_under_load(server, lambda: reg.promote(NAME, v2.version), bodies, concurrency=8,
                                        duration_s=2.0, swap_at_s=1.0)
        panels = scraper.panels()
        _, version = scraper.series("workbench_model_version")
        assert version[0] == 1 and version[-1] == 2 and (np.diff(version) >= 0).all()
        assert panels["model version"][""][1][-1] == 2
        _, ok_rate = panels["requests per second (by status)"]["200"]
        assert ok_rate.max() > 0 and set(panels["requests per second (by status)"]) == {"200"}
        _, rows = panels["rows per ONNX Runtime call"][""]
        assert 1 <= rows.max() <= 2 * 8  # 8 clients of 2 rows each: at most 16 rows per call
        assert during.errors == 0 and during.ok == during.requests > 0
        assert set(during.versions) == {"1", "2"}  # answers from both versions, none failed
        # Requests sent after the first answer from version 2 are never answered by version 1 again.
        t, version = during.timeline[:, 0], during.timeline[:, 3]
        first_new = t[version == 2].min()
        assert (version[t > first_new + 0.1] == 2).all()
        assert httpx.get(server.url + ROUTES["ready"]).json()["version"] == 2
        metrics = httpx.get(server.url + ROUTES["metrics"]).text
        assert "workbench_model_swaps_total 1.0" in metrics
    assert server.proc.poll() is not None  # stopped, nothing left behind


def test_closed_loop_counts_errors_and_statuses(tmp_path):
    # A server that answers 401 to every request: each one is counted as an error with its status.
    good, _ = results()
    settings = ServeSettings(api_key="right-key-123", poll_seconds=0)
    bodies = payloads_from(data.load("digits").X_test[:4])
    with ServerProcess(good.onnx_path, settings=settings) as server:
        bad = closed_loop(server.url + ROUTES["predict"], bodies, concurrency=2, duration_s=0.5, warmup_s=0)
        good_run = closed_loop(server.url + ROUTES["predict"], bodies, concurrency=2, duration_s=0.5, warmup_s=0,
                               api_key="right-key-123")
    assert bad.ok == 0 and bad.errors == bad.requests > 0 and set(bad.status_counts) == {"401"}
    assert good_run.errors == 0 and good_run.ok > 0 and good_run.p99_ms >= good_run.p50_ms > 0


@pytest.mark.parametrize("call, message", [
    (lambda b: closed_loop("http://example.com/predict", b), "only targets this machine"),
    (lambda b: closed_loop("https://127.0.0.1/predict", b), "plain http"),
    (lambda b: closed_loop("http://127.0.0.1:9/predict", b, duration_s=0), "duration_s"),
    (lambda b: closed_loop("http://127.0.0.1:9/predict", b, duration_s=10_000), "duration_s"),
    (lambda b: closed_loop("http://127.0.0.1:9/predict", b, concurrency=0), "concurrency"),
    (lambda b: open_loop("http://127.0.0.1:9/predict", b, rate=-1), "rate"),
    (lambda b: open_loop("http://127.0.0.1:9/predict", []), "at least one request body"),
])
def test_load_generator_refuses_bad_settings(call, message):
    with pytest.raises(WorkbenchError, match=message):
        call([b"{}"])


def test_unreachable_server_counts_as_errors():
    from workbench.serve.process import free_port

    r = closed_loop(f"http://127.0.0.1:{free_port()}/predict", [b"{}"], concurrency=2, duration_s=0.3, warmup_s=0)
    assert r.ok == 0 and r.errors == r.requests > 0 and set(r.status_counts) == {"0"}


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", f"{NAME}@champion"], "no registered model named 'digits-mlp'"),
    (["serve", "--model", "no/such/file.onnx"], "does not exist"),
    (["serve", "--model", "bad ref"], "cannot read the model reference"),
    (["serve", "--model", "x.onnx", "--api-key", "short"], "at least 8 characters"),
])
def test_serve_command_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    reg = fresh_registry(tmp_path / "registry")
    assert cli.main([*argv, "--registry", reg.uri]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("workbench serve: error:")


def test_serve_on_a_busy_port_is_a_clear_error(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model", results()[0].onnx_path, "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Address already in use" in captured.err and "another --port" in captured.err

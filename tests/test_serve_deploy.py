"""Deployment files agree with the app (port, probes, metrics path, command) and pass promtool's checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from workbench.errors import WorkbenchError
from workbench.serve import cli
from workbench.serve.app import DEFAULT_PORT, METRIC_NAMES, ROUTES
from workbench.serve.monitor import CONFIG_FILE, DEPLOY_DIR, RULES_FILE

K8S = DEPLOY_DIR / "k8s"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                                              "prometheus; .ci/run installs it)")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _container() -> dict:
    (deployment,) = _docs("deployment.yaml")
    assert deployment["kind"] == "Deployment"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _parse(args: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(args)


def _tiny_onnx(path: Path) -> Path:
    """A 4-feature identity "classifier": enough for `workbench serve` to load, instant to build."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def served(monkeypatch):
    """Stub out the blocking uvicorn loop; record what `serve` would have run."""
    import workbench.serve.app as app_module

    calls = []
    monkeypatch.setattr(app_module, "run_server", lambda app, **kw: calls.append(kw))
    monkeypatch.delenv("WORKBENCH_API_KEY", raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_serve_refuses_a_non_loopback_address_without_an_api_key(served, capsys, tmp_path, host):
    assert cli.main(["serve", "--model", str(_tiny_onnx(tmp_path / "m.onnx")), "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench serve: error:") and err.count("\n") == 1
    assert host in err and "WORKBENCH_API_KEY" in err and "--insecure" in err
    assert served == []  # refused before listening


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_serve_on_loopback_needs_no_api_key(served, capsys, tmp_path, host):
    assert cli.main(["serve", "--model", str(_tiny_onnx(tmp_path / "m.onnx")), "--host", host]) == 0
    assert served and served[0]["host"] == host and capsys.readouterr().err == ""


def test_serve_insecure_warns_and_a_key_is_enough(served, capsys, tmp_path, monkeypatch):
    model = str(_tiny_onnx(tmp_path / "m.onnx"))
    assert cli.main(["serve", "--model", model, "--host", "0.0.0.0", "--insecure"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "without an API key" in err
    monkeypatch.setenv("WORKBENCH_API_KEY", "a-long-enough-key")
    assert cli.main(["serve", "--model", model, "--host", "0.0.0.0"]) == 0
    assert capsys.readouterr().err == "" and len(served) == 2


def test_body_timeout_flag_and_environment_variable(served, tmp_path, monkeypatch, capsys):
    import workbench.serve.app as app_module

    seen = []
    real = app_module.create_app
    monkeypatch.setattr(app_module, "create_app", lambda *a, **kw: seen.append(a[1]) or real(*a, **kw))
    model = str(_tiny_onnx(tmp_path / "m.onnx"))
    assert cli.main(["serve", "--model", model]) == 0
    monkeypatch.setenv("WORKBENCH_BODY_TIMEOUT_S", "2.5")
    assert cli.main(["serve", "--model", model]) == 0
    assert cli.main(["serve", "--model", model, "--body-timeout-s", "0.25"]) == 0
    assert [s.body_timeout_s for s in seen] == [10.0, 2.5, 0.25]
    monkeypatch.setenv("WORKBENCH_BODY_TIMEOUT_S", "soon")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--model", model])
    assert exit_.value.code == 2 and "WORKBENCH_BODY_TIMEOUT_S" in capsys.readouterr().err


def test_kubernetes_probes_port_and_command_are_the_apps():
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": DEFAULT_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": ROUTES["ready"], "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": ROUTES["live"], "port": "http"}
    args = _parse(c["args"])
    assert args.command == "serve" and args.port == DEFAULT_PORT and args.host == "0.0.0.0"
    assert "@" in args.model  # served from the registry by alias, so promotions reach it
    env = {e["name"]: e for e in c["env"]}
    assert {"WORKBENCH_REGISTRY_URI", "WORKBENCH_API_KEY"} <= set(env)
    # The key comes from a Secret that must exist (no optional: true, no literal value), and nothing opts out.
    ref = env["WORKBENCH_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["WORKBENCH_API_KEY"] and not ref.get("optional", False)
    assert "--insecure" not in c["args"] and not args.insecure
    cli.check_exposure(args.host, "from-the-secret", args.insecure)  # a key is all 0.0.0.0 needs
    pod = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_and_service_monitor_select_the_pods_and_scrape_metrics():
    (deployment,) = _docs("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = _docs("service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    (monitor,) = _docs("servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": ROUTES["metrics"], "interval": endpoint["interval"]}


def test_dockerfile_runs_the_server_as_non_root_with_a_healthcheck():
    text = (DEPLOY_DIR / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    assert f"EXPOSE {DEFAULT_PORT}" in lines
    health = text[text.index("HEALTHCHECK"):]
    assert f"http://127.0.0.1:{DEFAULT_PORT}{ROUTES['ready']}" in health.split("ENTRYPOINT")[0]
    assert 'ENTRYPOINT ["workbench"]' in lines
    cmd = [line for line in lines if line.startswith("CMD [")][-1]  # the last: the first is the health check's
    args = _parse(yaml.safe_load(cmd[len("CMD "):]))
    assert args.command == "serve" and args.port == DEFAULT_PORT and args.host == "0.0.0.0"
    assert "torch==2.13.0" in text and "whl/cpu" in text  # the CPU wheel, not CUDA
    assert args.model == _parse(_container()["args"]).model  # the image and the manifest serve the same model
    # Safe by default: no key is baked into the image, so `docker run` without WORKBENCH_API_KEY refuses to start.
    assert not [line for line in lines if "WORKBENCH_API_KEY" in line]  # comments aside
    assert not args.insecure
    with pytest.raises(WorkbenchError, match="WORKBENCH_API_KEY"):
        cli.check_exposure(args.host, None, args.insecure)


def test_prometheus_config_scrapes_the_metrics_route_and_rules_use_real_metrics():
    cfg = yaml.safe_load(CONFIG_FILE.read_text())
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == ROUTES["metrics"]
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{DEFAULT_PORT}"]
    rules = yaml.safe_load(RULES_FILE.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"WorkbenchHighP99Latency", "WorkbenchHighErrorRate", "WorkbenchPredictionDrift"} <= names
    known = {n.removesuffix("_total") for n in METRIC_NAMES}
    for rule in rules:
        for metric in re.findall(r"\b(workbench_[a-z_]+)", rule["expr"]):
            base = re.sub(r"_(bucket|sum|count|total)$", "", metric)
            assert base in known, f"{rule['alert']} uses {metric}, which the server does not export"
        for route in re.findall(r'route="([^"]+)"', rule["expr"]):
            assert route in ROUTES.values()
    # The error-rate alert counts server errors only: a client that hangs up (499) or sends junk (4xx) cannot fire it.
    (error_rate,) = [r for r in rules if r["alert"] == "WorkbenchHighErrorRate"]
    numerator = re.split(r"\s/\s", error_rate["expr"])[0]
    assert 'status=~"5.."' in numerator and numerator.count("workbench_http_requests_total") == 1


@needs_promtool
@pytest.mark.parametrize("args", [["check", "config", str(CONFIG_FILE)], ["check", "rules", str(RULES_FILE)],
                                  ["test", "rules", str(RULES_FILE.with_name("alerts_test.yml"))]])
def test_promtool_accepts_config_rules_and_rule_tests(args):
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=RULES_FILE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_monitor_config_points_prometheus_at_one_server():
    from workbench.serve.monitor import Prometheus, prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    cfg = yaml.safe_load(Prometheus("http://127.0.0.1:8123", interval=0.5).config_text())
    assert cfg["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:8123"]}]
    assert cfg["global"]["scrape_interval"] == "500ms" and Path(cfg["rule_files"][0]).is_file()


def _tiny_gpt(path):
    from workbench import llm

    tok = llm.CharTokenizer("abc ")
    model = llm.GPT(llm.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return llm.checkpoint.save(path, model, tok)


def test_serve_a_gpt_alone_or_beside_a_model(served, capsys, tmp_path):
    gpt = str(_tiny_gpt(tmp_path / "gpt.pt"))
    assert cli.main(["serve", "--gpt", gpt]) == 0
    assert cli.main(["serve", "--gpt", gpt, "--model", str(_tiny_onnx(tmp_path / "m.onnx"))]) == 0
    assert len(served) == 2 and "/generate" in served[0]["banner"] and "/predict /generate" in served[1]["banner"]
    assert cli.main(["serve"]) == 2
    assert "nothing to serve" in capsys.readouterr().err
    assert cli.main(["serve", "--gpt", str(_tiny_onnx(tmp_path / "x.onnx"))]) == 2
    err = capsys.readouterr().err
    assert "not a GPT checkpoint" in err and err.count("\n") == 1

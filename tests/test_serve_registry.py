"""The MLflow registry: register with metadata, aliases, promote, rollback, sha256 checks, concurrency, the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
from test_serve_common import NAME, fresh_registry, results

from workbench import cli as workbench_cli
from workbench.errors import WorkbenchError
from workbench.serve import cli
from workbench.serve.registry import Registry, parse_ref, sha256_file, tracking_uri

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture()
def reg(tmp_path):
    return fresh_registry(tmp_path / "registry")


def test_register_result_records_recipe_metrics_fingerprints_and_sha(reg):
    good, _ = results()
    v = reg.register_result(good, name=NAME)
    assert v.version == 1 and v.aliases == ("challenger",)
    assert v.recipe == good.recipe.to_dict()
    assert v.metrics["accuracy"] == pytest.approx(good.accuracy)
    assert v.metrics["latency_ort_b1_p50_us"] == pytest.approx(good.latency_ort_b1.p50_us)
    assert v.metrics["size_onnx_bytes"] == good.size_onnx_bytes
    assert v.sha256 == sha256_file(good.onnx_path)  # stored byte for byte
    assert v.tags["result_key"] == good.key and len(v.tags["data_fingerprint"]) == 64
    assert v.tags["model_fingerprint"] == sha256_file(good.checkpoint_path)
    assert v.input_shape == (1, 8, 8) and sum(v.class_share) == pytest.approx(1.0, abs=1e-4)
    # It is a real MLflow run and model version: the run has the metrics and parameters.
    run = reg.client.get_run(v.run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(good.accuracy)
    assert run.data.params["model"] == "mlp"
    path, loaded = reg.load(f"{NAME}/1")
    assert sha256_file(path) == v.sha256 and loaded == v


def test_default_registry_lives_under_the_workbench_cache(monkeypatch, tmp_path):
    from workbench.serve.registry import default_uri

    monkeypatch.delenv("WORKBENCH_REGISTRY_URI", raising=False)
    monkeypatch.delenv("WORKBENCH_REGISTRY", raising=False)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert default_uri() == f"sqlite:///{tmp_path.resolve() / 'registry' / 'mlflow.db'}"
    monkeypatch.setenv("WORKBENCH_REGISTRY_URI", "http://mlflow.internal:5000")
    assert default_uri() == "http://mlflow.internal:5000"
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # set when workbench.serve is imported


def test_promote_rollback_and_aliases(reg):
    good, weak = results()
    v1 = reg.register_result(good, name=NAME, alias=None)
    v2 = reg.register_result(weak, name=NAME)
    assert reg.promote(NAME, v1.version).aliases == ("champion",)
    promoted = reg.promote(NAME, v2.version)
    assert promoted.aliases == ("champion",)  # the challenger alias moved off it
    assert reg.history(NAME) == [1, 2]
    assert reg.resolve(f"{NAME}@champion").version == 2
    back = reg.rollback(NAME)
    assert back.version == 1 and reg.resolve(f"{NAME}@champion").version == 1
    assert reg.get(NAME, 2).tags["rolled_back"] == "true"
    with pytest.raises(WorkbenchError, match="no previous champion"):
        reg.rollback(NAME)
    listed = reg.versions(NAME)
    assert [v.version for v in listed] == [1, 2] and listed[0].aliases == ("champion",)


@pytest.mark.parametrize("action, message", [
    (lambda r: r.promote(NAME, 7), "has no version 7; its versions: 1"),
    (lambda r: r.get(NAME, "staging"), "has no alias 'staging'"),
    (lambda r: r.get("nope", 1), "no registered model named 'nope'"),
    (lambda r: r.promote(NAME, "x"), "positive whole number"),
    (lambda r: r.set_alias(NAME, "v3", 1), "aliases are a letter"),
])
def test_bad_references_are_clear_errors(reg, action, message):
    reg.register_result(results()[0], name=NAME)
    with pytest.raises(WorkbenchError, match=message):
        action(reg)


@pytest.mark.parametrize("ref", ["digits", "digits@", "@champion", "digits/0", "digits/x", "a b@c", 3])
def test_parse_ref_rejects_malformed(ref):
    with pytest.raises(WorkbenchError, match="NAME@ALIAS"):
        parse_ref(ref)


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # one weight changes
    path.write_bytes(bytes(data))


def test_tampered_file_is_refused(reg):
    v = reg.register_result(results()[0], name=NAME)
    tamper(reg.local_path(v))
    with pytest.raises(WorkbenchError, match="changed after registration, refusing"):
        reg.load(f"{NAME}/1")
    with pytest.raises(WorkbenchError, match="changed after registration"):
        reg.promote(NAME, 1)  # promotion verifies the file first
    with pytest.raises(WorkbenchError):
        reg.resolve(f"{NAME}@champion")  # ... so nothing was promoted


def test_missing_file_is_refused(reg):
    v = reg.register_result(results()[0], name=NAME)
    reg.local_path(v).unlink()
    with pytest.raises(WorkbenchError, match="ONNX file .* is missing"):
        reg.load(v.ref)


def test_register_rejects_bad_input(reg, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(WorkbenchError, match="not a valid ONNX model"):
        reg.register(bad, name=NAME)
    with pytest.raises(WorkbenchError, match="does not exist"):
        reg.register(tmp_path / "none.onnx", name=NAME)
    with pytest.raises(WorkbenchError, match="model names"):
        reg.register(results()[0].onnx_path, name="bad name!")
    with pytest.raises(WorkbenchError, match="uri or a local root"):
        Registry("sqlite:///x.db", root=tmp_path)


def _register_in_child(root: str, onnx_path: str, tag: str, n: int) -> None:
    # The same database under a different spelling: MLflow caches one engine per URI, and a forked
    # child must open its own connections rather than reuse the parent's.
    reg = Registry(f"sqlite:///{root}/./mlflow.db")
    for i in range(n):
        reg.register(onnx_path, name=NAME, tags={"writer": tag, "i": str(i)})


def test_concurrent_registrations_from_several_processes_lose_nothing(reg):
    good, _ = results()
    # Separate processes with their own connections, as separate users' would be (forked: spawning
    # each would cost seconds of imports).
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_register_in_child, args=(str(reg.root), good.onnx_path, f"p{k}", 3))
             for k in range(1, 3)]
    for p in procs:
        p.start()
    _register_in_child(str(reg.root), good.onnx_path, "p0", 3)  # this process writes at the same time
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = reg.versions(NAME)
    assert [v.version for v in versions] == list(range(1, 10))
    assert sorted((v.tags["writer"], v.tags["i"]) for v in versions) == \
        sorted((f"p{k}", str(i)) for k in range(3) for i in range(3))
    for v in versions:  # every one is complete and loadable
        assert reg.load(v)[1].sha256 == v.sha256


def test_cli_list_promote_rollback(reg, capsys):
    good, weak = results()
    reg.register_result(good, name=NAME, alias=None)
    reg.register_result(weak, name=NAME)
    uri = ["--registry", reg.uri]
    assert cli.main(["registry", "promote", NAME, "1", *uri]) == 0
    assert cli.main(["registry", "promote", NAME, "2", *uri]) == 0
    assert "champion is now version 2" in capsys.readouterr().out
    assert cli.main(["registry", "rollback", NAME, *uri]) == 0
    assert "champion is version 1 again" in capsys.readouterr().out
    assert cli.main(["registry", "list", *uri]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "(rolled back)" in out and f"{good.accuracy:.4f}" in out
    assert cli.main(["registry", "list", NAME, "--json", *uri]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [1, 2] and rows[0]["aliases"] == ["champion"]


@pytest.mark.parametrize("argv, message", [
    (["registry", "promote", NAME, "9"], "has no version 9"),
    (["registry", "rollback", NAME], "no previous champion"),
    (["registry", "list", "unknown-model"], "no registered model named 'unknown-model'"),
])
def test_cli_errors_are_one_line_exit_2(reg, capsys, argv, message):
    reg.register_result(results()[0], name=NAME)
    assert cli.main([*argv, "--registry", reg.uri]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("workbench registry: error:")


@pytest.mark.parametrize("action", ["rollback", "promote"])
def test_the_alias_never_moves_to_a_tampered_version(reg, capsys, action):
    good, weak = results()
    reg.register_result(good, name=NAME, alias=None)
    reg.register_result(weak, name=NAME)
    reg.promote(NAME, 1)
    reg.promote(NAME, 2)
    if action == "promote":
        reg.register_result(good, name=NAME)
    target = 1 if action == "rollback" else 3
    tamper(reg.local_path(reg.get(NAME, target)))
    argv = ["registry", "rollback", NAME] if action == "rollback" else ["registry", "promote", NAME, "3"]
    assert workbench_cli.main([*argv, "--registry", reg.uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("workbench registry: error: ")
    assert f"model '{NAME}' to version {target}: sha256 mismatch" in err
    assert "the champion alias was NOT moved (it still points at version 2)" in err
    assert reg.resolve(f"{NAME}@champion").version == 2 and reg.history(NAME) == [1, 2]
    assert "rolled_back" not in reg.get(NAME, 2).tags


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "unsupported registry URI scheme 'foo' in 'foo://bar'; expected a folder path, file:///FOLDER, "
                  "sqlite:///PATH.db"),
    ("sqlite:////proc/x.db", "cannot create the registry database at /proc/x.db ("),
    ("sqlite:///{tmp}/afile/x.db", "cannot create the registry database at {tmp}/afile/x.db ({tmp}/afile is a file, "
                                   "not a folder); expected a folder this user can write"),
    ("{tmp}/afile/sub/registry", "cannot create the registry database at {tmp}/afile/sub/registry/mlflow.db ("),
    ("sqlite:///{tmp}/adir", "cannot open the registry database at {tmp}/adir (a folder is in the way"),
])
def test_cli_bad_registry_uri_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, capsys, uri, message):
    monkeypatch.chdir(tmp_path)  # MLflow would make ./mlruns for some URIs
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    before = sorted(tmp_path.rglob("*"))
    proc_before = set(Path("/proc").glob("*.db")) | set(Path("/proc").glob(".lock"))
    uri = uri.format(tmp=tmp_path)
    assert workbench_cli.main(["registry", "list", "--registry", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("workbench registry: error: "), err
    assert message.format(tmp=tmp_path) in err
    assert sorted(tmp_path.rglob("*")) == before
    assert set(Path("/proc").glob("*.db")) | set(Path("/proc").glob(".lock")) == proc_before


def test_a_folder_or_file_uri_is_a_local_sqlite_registry(tmp_path, capsys):
    assert tracking_uri(str(tmp_path / "reg")) == f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}"
    assert tracking_uri((tmp_path / "reg").as_uri()) == f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}"
    assert tracking_uri(f"{tmp_path}/r.db") == f"sqlite:///{tmp_path / 'r.db'}"
    for kept in ("sqlite:///x.db", "http://mlflow:5000", "postgresql+psycopg2://u@h/db", "databricks"):
        assert tracking_uri(kept) == kept
    assert workbench_cli.main(["registry", "list", "--registry", str(tmp_path / "reg")]) == 0
    assert "no registered models" in capsys.readouterr().out and (tmp_path / "reg" / "mlflow.db").is_file()

"""The command line: train -> info -> export, bench, help, and one-line errors with status 2."""

import json
import os
import subprocess
import sys

import pytest

from workbench import bench
from workbench.cli import main


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def test_train_info_export(tmp_path, capsys):
    ckpt, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    assert main(["train", "--model", "cnn", "--epochs", "2", "--option", "batchnorm=false",
                 "--option", "channels=[8,16]", "--out", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and ckpt.is_file()
    assert main(["info", str(ckpt)]) == 0
    info = capsys.readouterr().out
    assert "cnn" in info and "parameters:" in info and "MACs:" in info and "test accuracy: " in info
    assert main(["export", str(ckpt), "--out", str(onnx_file)]) == 0
    out = capsys.readouterr().out
    assert onnx_file.is_file() and "max abs err" in out and "top-1 agreement 1.0000" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "missing.pt"], "does not exist"),
        (["export", "notes.txt", "--out", "x.onnx"], "not a workbench checkpoint"),
        (["train", "--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--out", "m.pt"], "at least 16x16"),
        (["train", "--dataset", "mnist", "--data-root", "nowhere", "--epochs", "1", "--out", "m.pt"], "train-images"),
        (["train", "--option", "bogus=1", "--epochs", "1", "--out", "m.pt"], "unknown option"),
        (["bench", "--only", "nope"], "unknown bench group"),
        (["train", "--lr-schedule", "cosine", "--lr-option", "warmup_epochs=9", "--epochs", "3", "--out", "m.pt"],
         "warmup_epochs must be in [0, epochs)"),
        (["compress", "--model", "mlp", "--epochs", "1", "--fold-bn", "--out", "m.pt"], "BatchNorm"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["info", "--help"], ["export", "--help"],
                                  ["bench", "--help"], ["generate", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage: workbench" in capsys.readouterr().out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "resnet", "--out", "m.pt"])
    assert exc.value.code == 2 and "invalid choice: 'resnet'" in capsys.readouterr().err


def test_console_script_and_module_entry_points():
    for cmd in (["workbench", "--version"], [sys.executable, "-m", "workbench", "--version"]):
        if cmd[0] == "workbench":
            cmd[0] = str(__import__("pathlib").Path(sys.executable).with_name("workbench"))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("workbench ")


def test_bench_writes_the_contract(tmp_path, monkeypatch, capsys):
    def tiny(*, cache, progress):
        return [{"name": "row"}], {"tiny_figure": 1.5}

    monkeypatch.setitem(bench.GROUPS, "tiny", tiny)
    path = tmp_path / "out" / "bench.json"
    assert main(["bench", "--only", "tiny", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert set(report) >= {"machine", "results", "figures"}
    assert report["figures"] == {"tiny_figure": 1.5} and report["results"] == [{"group": "tiny", "name": "row"}]
    assert report["machine"]["logical_cores"] >= 1 and "torch" in report["machine"]
    assert "tiny_figure" in capsys.readouterr().out


def test_bench_check_fails_on_a_missed_bar_with_one_line_each(tmp_path, monkeypatch, capsys):
    from fractions import Fraction

    def short(*, cache, progress):  # 300 of 360 is short of the ViT's bar
        return [], {"baseline_acc_vit_digits": Fraction(300, 360), "onnx_top1_agreement": 1.0}

    monkeypatch.setitem(bench.GROUPS, "short", short)
    path = tmp_path / "bench.json"
    assert main(["bench", "--only", "short", "--json", str(path)]) == 0      # reported, not enforced
    capsys.readouterr()
    assert main(["bench", "--only", "short", "--check", "--json", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    bar = str(bench.bars.BARS["baseline_acc_vit_digits"])
    assert len(err) == 1 and "baseline_acc_vit_digits" in err[0] and bar in err[0] and "kernels" in err[0]
    report = json.loads(path.read_text())
    assert report["bars"]["baseline_acc_vit_digits"]["ok"] is False and report["bars"]["onnx_top1_agreement"]["ok"]
    assert report["figures"]["baseline_acc_vit_digits"] == 300 / 360  # JSON gets the nearest float


def test_compress_prunes_and_reports(tmp_path, capsys):
    out, onnx_file = tmp_path / "small.pt", tmp_path / "small.onnx"
    argv = ["compress", "--model", "mlp", "--epochs", "2", "--option", "hidden=[32]", "--prune", "0.5",
            "--prune-kind", "structured", "--finetune-epochs", "1", "--out", str(out), "--onnx", str(onnx_file)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "structured pruning 50%" in text and "parameters" in text and "MACs" in text
    assert out.is_file() and onnx_file.is_file()
    assert main(["info", str(out)]) == 0
    assert "'hidden': (16,)" in capsys.readouterr().out
    assert main(["compress", "--model", "mlp", "--epochs", "1", "--out", str(out)]) == 2
    assert "nothing to compress" in capsys.readouterr().err


def test_compress_quantizes_and_info_reads_it(tmp_path, capsys):
    out = tmp_path / "q.pt"
    assert main(["compress", "--model", "mlp", "--epochs", "2", "--option", "hidden=[32]", "--bits", "4",
                 "--qat", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4-bit weights" in text and "QAT 3 epochs" in text and "packed weights" in text
    assert main(["info", str(out)]) == 0
    assert "weights 4-bit" in capsys.readouterr().out


def test_deployment_flags(tmp_path, capsys):
    """compress --ort-quant writes the int8 ONNX model; export --opt-level / --providers report the graph."""
    ckpt, onnx_file, q_onnx = tmp_path / "m.pt", tmp_path / "m.onnx", tmp_path / "q.onnx"
    assert main(["compress", "--model", "mlp", "--epochs", "2", "--lr-schedule", "cosine", "--ort-quant", "dynamic",
                 "--out", str(ckpt), "--onnx", str(q_onnx)]) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime int8, dynamic" in out and q_onnx.is_file()
    import onnx

    assert any(n.op_type == "DynamicQuantizeLinear" or n.op_type.startswith("MatMulInteger")
               for n in onnx.load(str(q_onnx)).graph.node)
    assert main(["export", str(ckpt), "--out", str(onnx_file), "--opt-level", "extended", "--providers", "auto"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m.extended.onnx").is_file() and "nodes after 'extended' optimization" in out
    assert "nodes per provider: CPUExecutionProvider" in out
    assert main(["export", str(ckpt), "--out", str(onnx_file), "--providers", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not installed" in err and "available:" in err and len(err.splitlines()) == 1


def test_register_promote_list_from_the_command_line(tmp_path, capsys):
    """train --register puts the model in the registry (the fixture's cache holds it); list and promote see it."""
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--epochs", "1", "--option", "hidden=[16]", "--out", str(ckpt),
                 "--register", "cli-mlp"]) == 0
    assert "registered cli-mlp version 1 (alias challenger)" in capsys.readouterr().out
    assert main(["registry", "promote", "cli-mlp", "1"]) == 0
    assert "champion is now version 1" in capsys.readouterr().out
    assert main(["registry", "list"]) == 0
    out = capsys.readouterr().out
    assert "cli-mlp" in out and "champion" in out
    assert main(["registry", "promote", "cli-mlp", "7"]) == 2
    assert "7" in capsys.readouterr().err
    before = ckpt.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:  # refused before any training starts
        mp.setattr("workbench.recipe.run", lambda *a, **k: pytest.fail("trained before checking the name"))
        assert main(["train", "--epochs", "99", "--out", str(ckpt), "--register", "bad name!"]) == 2
    assert "model names are" in capsys.readouterr().err
    assert ckpt.stat().st_mtime_ns == before


@pytest.fixture
def careless(tmp_path, monkeypatch):
    """A working folder with the files careless commands point at: a text file, a folder, and checkpoints
    (a good one, one whose spec lacks input_shape, one whose spec asks for a 40-billion-parameter model)."""
    import torch

    from workbench import models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "adir").mkdir()
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,))
    spec = {"name": "mlp", "input_shape": (1, 8, 8), "num_classes": 10, "options": {"hidden": (16,)}}
    good = models.save_checkpoint(tmp_path / "m.pt", model, spec=spec)
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "spec": {k: v for k, v in payload["spec"].items() if k != "input_shape"}},
               tmp_path / "noshape.pt")
    torch.save({**payload, "spec": {**payload["spec"], "options": {"hidden": [200000, 200000]}}}, tmp_path / "huge.pt")
    return tmp_path


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "cache" not in p.parts)


def _main_status(argv):
    """main's return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# Folders no one can write into (Linux's /proc and /sys); elsewhere these cases are skipped.
_NOT_WRITABLE = [pytest.param([cmd, *args, "--out", out], "cannot write",
                              marks=pytest.mark.skipif(not os.path.isdir(os.path.dirname(out)), reason="no folder"))
                 for out in ("/proc/m.pt", "/sys/m.pt")
                 for cmd, *args in (["train"], ["compress", "--prune", "0.5"], ["export", "m.pt"])]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # numbers a Recipe refuses (before: traceback, or a 10% model trained on lr=inf)
        (["train", "--weight-decay", "-1", "--out", "o.pt"], "weight_decay must be a finite number >= 0"),
        (["train", "--weight-decay", "nan", "--out", "o.pt"], "weight_decay must be a finite number >= 0"),
        (["train", "--epochs", "99999999999999999999999", "--out", "o.pt"], "epochs must be in 0..1,000,000"),
        (["train", "--lr", "inf", "--out", "o.pt"], "lr must be a finite number > 0"),
        (["train", "--batch-size", "-3", "--out", "o.pt"], "batch_size must be >= 1"),
        (["compress", "--prune", "0.5", "--finetune-lr", "nan", "--out", "o.pt"], "finetune_lr"),
        # model sizes and option values, checked before anything is allocated
        (["train", "--option", "hidden=[200000,200000]", "--out", "o.pt"],
         "40,015,200,010 parameters; the limit is 100,000,000"),
        (["train", "--model", "cnn", "--option", "channels=[100000,100000]", "--out", "o.pt"], "the limit is"),
        (["train", "--model", "vit", "--option", "depth=1000000000", "--out", "o.pt"], "the limit is"),
        (["train", "--option", "hidden=foo", "--out", "o.pt"], "hidden must be a list of positive integers"),
        (["train", "--option", "hidden=1e30", "--out", "o.pt"], "hidden must be a list of positive integers"),
        (["train", "--option", "hidden=[16.5]", "--out", "o.pt"], "hidden must be a list of positive integers"),
        (["train", "--model", "cnn", "--option", "batchnorm=maybe", "--out", "o.pt"],
         "batchnorm must be true or false"),
        (["train", "--option", "=3", "--out", "o.pt"], "expected KEY=VALUE"),
        # checkpoints that are not what they should be
        (["info", "huge.pt"], "40,015,200,010 parameters"),
        (["export", "huge.pt", "--out", "x.onnx"], "40,015,200,010 parameters"),
        (["info", "noshape.pt"], "has no 'input_shape'"),
        (["export", "noshape.pt", "--out", "x.onnx"], "has no 'input_shape'"),
        (["info", "nothere.pt"], "does not exist"),
        (["info", "notes.txt"], "not a PyTorch file"),
        (["info", "adir"], "is a folder"),
        (["export", "adir", "--out", "x.onnx"], "is a folder"),
        (["info", ""], "empty"),
        # outputs that cannot be written, found before any work starts
        *_NOT_WRITABLE,
        (["train", "--out", "notes.txt/model.pt"], "'notes.txt' is a file, not a folder"),
        (["compress", "--prune", "0.5", "--out", "o.pt", "--onnx", "notes.txt/o.onnx"], "is a file, not a folder"),
        (["export", "m.pt", "--out", "notes.txt/x.onnx"], "is a file, not a folder"),
        (["export", "m.pt", "--out", "adir"], "'adir' is a folder"),
        (["train", "--out", "adir"], "'adir' is a folder"),
        (["train", "--out", ""], "--out is empty"),
        pytest.param(["train", "--out", "/dev/null"], "is not a regular file",
                     marks=pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")),
        (["export", "m.pt", "--out", "m.pt"], "would overwrite the checkpoint"),
        (["compress", "--prune", "0.5", "--out", "o.pt", "--onnx", "o.pt"], "same file"),
        # execution providers, checked before the export (before: a complete file was left behind)
        (["export", "m.pt", "--out", "x.onnx", "--providers", "nosuch"], "not installed"),
        (["export", "m.pt", "--out", "x.onnx", "--providers", ""], "--providers is empty"),
        (["export", "m.pt", "--out", "x.onnx", "--providers", ","], "--providers is empty"),
        # argparse's own errors are one line too
        (["train", "--model", "", "--out", "o.pt"], "invalid choice: ''"),
        (["train", "--epochs", "many", "--out", "o.pt"], "invalid int value: 'many'"),
    ],
)
def test_careless_inputs_exit_2_with_one_line_and_leave_no_file(careless, capsys, argv, message):
    before = _files(careless)
    assert _main_status(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _files(careless) == before, "a failed command leaves no file (and no folder) behind"


def test_unavailable_provider_fails_before_writing(careless, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is installed here")
    before = _files(careless)
    assert main(["export", "m.pt", "--out", "sub/x.onnx", "--providers", "cuda"]) == 2
    assert "'cuda' is not installed" in capsys.readouterr().err
    assert _files(careless) == before


def test_failed_export_leaves_no_file_and_a_good_one_writes_where_asked(careless, capsys, monkeypatch):
    from workbench import onnx as wonnx

    def broken(*args, **kwargs):
        raise RuntimeError("the profiler broke")

    before = _files(careless)
    with monkeypatch.context() as patch, pytest.raises(RuntimeError):
        patch.setattr(wonnx, "provider_report", broken)
        main(["export", "m.pt", "--out", "new/x.onnx", "--opt-level", "basic", "--providers", "auto"])
    assert _files(careless) == before
    assert main(["export", "m.pt", "--out", "new/x.onnx", "--opt-level", "basic"]) == 0
    assert _files(careless) == sorted(before + ["new", "new/x.basic.onnx", "new/x.onnx"])


def test_console_script_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "workbench", "train", "--lr", "inf", "--out", str(tmp_path / "m.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_flag_defaults_and_choices_are_the_librarys():
    """No flag copies a default or a choice list: plain `train`/`compress` build the default Recipe."""
    from workbench import cli, data, models, onnx, quant, schedules, train
    from workbench import recipe as wrecipe

    parser = cli.build_parser()
    assert cli._train_recipe(parser.parse_args(["train", "--out", "m.pt"])) == wrecipe.Recipe()
    defaults = parser.parse_args(["compress", "--out", "m.pt"])
    assert cli._compress_recipe(defaults) == wrecipe.Recipe()
    expected = {"model": [*models.MODELS, *wrecipe.LANGUAGE_MODELS], "dataset": [*data.DATASETS, *wrecipe.CORPORA],
                "optimizer": train.OPTIMIZERS, "prune_method": wrecipe.PRUNE_METHODS,
                "quant_method": wrecipe.QUANT_METHODS,
                "lr_schedule": schedules.KINDS, "prune_kind": wrecipe.PRUNE_KINDS, "scope": wrecipe.PRUNE_SCOPES,
                "schedule": wrecipe.PRUNE_SCHEDULES, "ort_quant": wrecipe.ORT_QUANT_MODES,
                "granularity": quant.GRANULARITIES, "calibration": quant.CALIBRATIONS, "opt_level": onnx.OPT_LEVELS}
    subparsers = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices
    seen = set()
    for name in ("train", "compress", "export"):
        for action in subparsers[name]._actions:
            if action.choices is not None:
                assert list(action.choices) == list(expected[action.dest]), action.dest
                seen.add(action.dest)
    assert seen == set(expected)

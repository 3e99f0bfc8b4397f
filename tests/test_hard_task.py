"""The harder embedded task: MNIST-1D generated locally, cached atomically, and the 1-D CNN trained on it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from workbench import data
from workbench.data import DATASETS, MNIST1D_ARGS, load
from workbench.errors import WorkbenchError
from workbench.recipe import Recipe, run


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One generated copy for the module's tests that only read it (generating takes about a second)."""
    return tmp_path_factory.mktemp("wbcache")


@pytest.fixture(autouse=True)
def cache_env(shared_cache, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(shared_cache))
    data._load_cached.cache_clear()
    yield shared_cache
    data._load_cached.cache_clear()


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download (mnist1d's get_dataset or an HTTP request) fails the test."""
    import mnist1d.data
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d must be generated locally, never downloaded")

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)
    monkeypatch.setattr(mnist1d, "get_dataset", refuse)
    monkeypatch.setattr(requests, "get", refuse)


def entry(cache) -> "os.PathLike":
    return cache / "data" / data._mnist1d_entry()


def test_shapes_splits_and_classes():
    ds = load("mnist1d")
    assert ds.input_shape == (1, 1, 40) and ds.num_classes == 10 and ds.classes == tuple("0123456789")
    assert ds.sizes == {"train": 3600, "val": 400, "test": 1000}  # the paper's 4,000 / 1,000, val from train
    for split in ("train", "val", "test"):
        X, y = ds.split(split)
        assert X.dtype == torch.float32 and y.dtype == torch.int64 and X.shape == (len(y), 1, 1, 40)
    # The val split is stratified: each class has 40 +- 1 of the 400.
    assert np.abs(np.bincount(ds.y_val.numpy(), minlength=10) - 40).max() <= 1


def test_deterministic_and_fingerprint_stable(tmp_path, monkeypatch, no_download):
    np_state, py_state = np.random.get_state(), random.getstate()
    a = load("mnist1d", seed=1)
    assert load("MNIST-1D", seed=1) is a and load("mnist_1d", seed=1) is a
    # Generated afresh in another cache: the same bytes, the same fingerprint.
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    b = load("mnist1d", seed=1)
    assert b is not a and b.fingerprint == a.fingerprint
    for split in ("train", "val", "test"):
        assert all(torch.equal(s, t) for s, t in zip(a.split(split), b.split(split)))
    # make_dataset seeds the global generators; load puts them back.
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    # The seed draws the train/val split only; the test split is the dataset's own.
    c = load("mnist1d", seed=2)
    assert c.fingerprint != a.fingerprint and torch.equal(c.y_test, a.y_test)
    assert not torch.equal(c.y_val, a.y_val)


def test_make_dataset_gets_every_argument_pinned(monkeypatch, tmp_path):
    import mnist1d.data

    seen = {}
    real = mnist1d.data.make_dataset

    def spy(args=None, **kwargs):
        seen.update(vars(args))
        return real(args, **kwargs)

    monkeypatch.setattr(mnist1d.data, "make_dataset", spy)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    load("mnist1d")
    defaults = mnist1d.data.get_dataset_args(as_dict=True)
    assert seen == MNIST1D_ARGS and set(defaults) - set(seen) == {"url"}


def test_normalized_with_train_statistics_only(cache_env):
    ds = load("mnist1d")
    X = ds.X_train.double()
    assert abs(X.mean().item()) < 1e-5 and abs(X.std(unbiased=False).item() - 1) < 1e-4
    with np.load(entry(cache_env) / "data.npz") as f:
        x, y, x_test = f["x"].astype(np.float64), f["y"], f["x_test"].astype(np.float64)
    train, val = data._stratified(y, 0.1, data._split_seeds(0)[0], "mnist1d")

    def undo(X):
        return (X.double().reshape(-1, 40) * ds.std[0] + ds.mean[0]).numpy()

    # Undoing the normalization gives back the cached signals of each split, and the stored mean/std
    # are those of the train rows (val rows excluded) ...
    assert np.abs(undo(ds.X_train) - x[train]).max() < 1e-5 and np.abs(undo(ds.X_val) - x[val]).max() < 1e-5
    assert ds.mean[0] == pytest.approx(x[train].mean(), abs=1e-6)
    assert ds.std[0] == pytest.approx(x[train].std(), abs=1e-6)
    assert abs(ds.mean[0] - x.mean()) > 1e-5  # ... not of train+val
    # ... and the test split went through the same affine map, not its own.
    test_rows = undo(ds.X_test)
    assert np.abs(test_rows - x_test).max() < 1e-5
    assert abs(ds.X_test.mean().item()) > 1e-4


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape"])
def test_a_damaged_cache_entry_is_regenerated(tmp_path, monkeypatch, no_download, damage):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    good = load("mnist1d").fingerprint
    path = entry(tmp_path) / "data.npz"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\0" * 100)
    else:
        np.savez(path, x=np.zeros((3, 40), np.float32), y=np.zeros(3, np.int64),
                 x_test=np.zeros((1, 40), np.float32), y_test=np.zeros(1, np.int64))
    # A half-written folder of another process is never read.
    (tmp_path / "data" / f".tmp-{data._mnist1d_entry()}-99999").mkdir()
    (tmp_path / "data" / f".tmp-{data._mnist1d_entry()}-99999" / "data.npz").write_bytes(raw[:10])
    data._load_cached.cache_clear()
    assert load("mnist1d").fingerprint == good
    assert path.read_bytes() == raw  # the entry was published again, whole
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".stale")]


def test_cached_entry_is_reused_without_generating(monkeypatch, cache_env):
    load("mnist1d")
    data._load_cached.cache_clear()
    monkeypatch.setattr(data, "_generate_mnist1d", lambda: pytest.fail("regenerated a valid cache entry"))
    assert load("mnist1d").sizes["test"] == 1000


def test_bad_names_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(WorkbenchError, match="known datasets: .*mnist1d") as info:
        load("mnist2d")
    assert "mnist1d" in DATASETS and str(info.value).endswith(", ".join(DATASETS))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "mnist1d.data", None)  # as if not installed
    with pytest.raises(WorkbenchError, match="pip install mnist1d=="):
        load("mnist1d")


def test_cnn1d_trains_end_to_end_on_mnist1d(tmp_path):
    res = run(Recipe(model="cnn1d", dataset="mnist1d", epochs=1, latency_repeats=3), cache=tmp_path, progress=False)
    assert res.test_n == 1000 and res.test_correct > 200  # one epoch: well above chance (100)
    assert res.params == 21_450 and res.macs > 0
    assert res.onnx_top1_agreement == 1 and res.onnx_max_abs_err < 1e-4


def test_cnn1d_is_prunable_and_quantizable():
    from workbench import prune, quant
    from workbench.models import build

    X = load("mnist1d").X_train[:256]
    model = build("cnn1d", input_shape=(1, 1, 40), num_classes=10)
    assert set(prune.prunable_layers(model)) == {"features.0", "features.3", "features.6", "classifier.1",
                                                 "classifier.3"}
    prune.apply_masks(model, prune.magnitude_masks(model, 0.9, scope="global"))
    assert prune.sparsity(model) == pytest.approx(0.9, abs=1e-3)
    small = prune.channel_prune(build("cnn1d", input_shape=(1, 1, 40), num_classes=10), 0.5, input_shape=(1, 1, 40))
    assert [m.out_channels for m in small.features if isinstance(m, torch.nn.Conv2d)] == [16, 16, 16]
    assert small(X[:4]).shape == (4, 10)
    q = quant.quantize_model(model, quant.QuantConfig(weight_bits=4, act_bits=8, granularity="per-tensor"), X)
    assert sum(isinstance(m, quant.FakeQuantLayer) for m in q.modules()) == 5
    with torch.no_grad():
        assert q(X).shape == (256, 10)


def test_bench_hard_figures_over_seeds(monkeypatch):
    """bench.hard from fake runs (no training): every seed counted, signs as documented, bars evaluated, JSON-ready."""
    import json
    from fractions import Fraction
    from types import SimpleNamespace

    from workbench import bars, bench
    from workbench.presets import HARD_SEEDS

    def correct(r) -> int:
        # Test counts out of 1,000 as a function of the recipe; the seed moves each by a few signals.
        if r.qat_epochs:
            base = 905
        elif r.weight_bits:
            base = 860 - 40 * (r.seed == HARD_SEEDS[-1])
        elif r.prune_amount:
            base = 500 if r.prune_schedule == "gradual" else 400 + 200 * (r.seed == HARD_SEEDS[1])
        elif r.teacher is not None:
            base = 610
        else:
            base = {"cnn1d": 920, "mlp": 560}[r.model]
        return base + r.seed

    def fake_run(r, **kwargs):
        return SimpleNamespace(test_correct=correct(r), test_n=1000, summary=lambda: {"seed": r.seed})

    def fake_distillation_runs(seed, *, teacher, student, **kwargs):
        return {"teacher": fake_run(teacher.replace(seed=seed)), "alone": fake_run(student.replace(seed=seed)),
                "distilled": fake_run(student.replace(seed=seed, teacher=teacher))}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "distillation_runs", fake_distillation_runs)
    rows, figures = bench.hard(cache=None, progress=False)
    assert figures["kd_gain_pp_hard"] == figures["kd_gain_pp_hard_seed_min"] == 5  # 610 vs 560 on every seed
    assert figures["ptq_int4_per_tensor_acc_drop_pp_hard"] == 6                     # 920 -> 860 on the first seed
    assert figures["ptq_int4_per_tensor_acc_drop_pp_hard_seed_min"] == 6
    assert figures["qat_over_ptq_int4_drop_hard_seed_max"] == Fraction(15, 60)  # 1.5 of 6 points (worst seed)
    # Positive when gradual keeps more than one-shot; the second seed is the one where one-shot wins.
    assert figures["prune_gradual_vs_oneshot_pp_hard"] == 10
    assert figures["prune_gradual_vs_oneshot_pp_hard_seed_min"] == -10
    assert {row["name"] for row in rows} >= {f"hard_kd_distilled_seed{s}" for s in HARD_SEEDS}
    json.dumps(rows)  # the bench writes rows as JSON: no Fractions in them
    checked = bars.evaluate(figures)
    assert {"kd_gain_pp_hard", "kd_gain_pp_hard_seed_min", "ptq_int4_per_tensor_acc_drop_pp_hard_seed_min",
            "qat_over_ptq_int4_drop_hard_seed_max"} <= set(checked) and all(b["ok"] for b in checked.values())

"""The pipeline: Recipe validation, run() measurements, and the on-disk cache."""

import json
import warnings

import pytest
import torch
from torch import nn

from workbench import Recipe, Result, WorkbenchError, load, run, sweep
from workbench.recipe import pipeline as pipeline_mod
from workbench.train import evaluate

FAST = dict(model="mlp", dataset="digits", epochs=2, latency_repeats=5, model_options={"hidden": [32]})


def test_recipe_is_frozen_hashable_and_round_trips():
    r = Recipe(**FAST)
    assert r.options == {"hidden": (32,)}
    assert hash(r) == hash(Recipe(**FAST)) and r == Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    with pytest.raises(Exception):
        r.epochs = 3
    assert r.replace(epochs=5).epochs == 5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(model="resnet50"), "unknown model 'resnet50'; known models: mlp"),
        (dict(dataset="imagenet"), "unknown dataset 'imagenet'; known datasets: digits"),
        (dict(epochs=-1), r"epochs must be in 0\.\.1,000,000"),
        (dict(epochs=10**23), r"epochs must be in 0\.\.1,000,000"),
        (dict(epochs=2.5), "epochs must be an integer"),
        (dict(threads=True), "threads must be an integer"),
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(lr=float("inf")), "lr must be a finite number > 0"),
        (dict(lr=float("nan")), "lr must be a finite number > 0"),
        (dict(lr="0.1"), "lr must be a finite number"),
        (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
        (dict(finetune_lr=float("inf"), prune_amount=0.5), "finetune_lr must be a finite number > 0"),
        (dict(kd_temperature=float("inf"), teacher={"model": "mlp"}), "kd_temperature must be a finite number"),
        (dict(prune_amount=float("nan")), r"prune_amount must be a fraction in \[0, 1\)"),
        (dict(prune_exclude="net.1"), "prune_exclude must be a list of layer names"),
        (dict(model_options=["hidden"]), "model_options must be a mapping"),
        (dict(model=3), "model must be a string"),
        (dict(seed=10**20), r"seed must be in 0\.\.2\*\*63-1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(prune_amount=0.5, finetune_epochs=10**14), r"finetune_epochs must be in 0\.\.1,000,000"),
        (dict(prune_amount=0.5, prune_schedule="gradual", prune_steps=10**17), r"prune_steps must be in 1\.\.1000"),
        (dict(weight_bits=8, qat_epochs=10**14), r"qat_epochs must be in 0\.\.1,000,000"),
        (dict(share_bits=4, share_epochs=10**14), r"share_epochs must be in 0\.\.1,000,000"),
        (dict(optimizer="rmsprop"), "unknown optimizer"),
        (dict(model_options={"hidden": object()}), "plain values"),
    ],
)
def test_bad_recipes_are_refused(changes, message):
    with pytest.raises(WorkbenchError, match=message):
        Recipe(**(FAST | changes))
    with pytest.raises(WorkbenchError, match="unknown recipe setting"):
        Recipe.from_dict({"model": "mlp", "prune": 0.5})


@pytest.fixture()
def first(tmp_path):
    return run(Recipe(**FAST), cache=tmp_path, progress=False), tmp_path


def test_run_measures_everything(first):
    res, cache = first
    assert not res.cached and 0.5 < res.accuracy <= 1 and 0 < res.val_accuracy <= 1
    assert res.params == 64 * 32 + 32 + 32 * 10 + 10 == res.nonzero_params
    assert res.macs == 64 * 32 + 32 * 10
    assert res.size_state_dict_bytes > 4 * res.params and res.size_onnx_bytes > 4 * res.params
    assert res.onnx_max_abs_err < 1e-4 and res.onnx_top1_agreement == 1.0
    assert res.latency_torch_b1.batch_size == 1 and res.latency_ort_b1.repeats == 5
    assert len(res.history["val_acc"]) == 2
    model = res.load_model()
    ds = load("digits")
    assert evaluate(model, ds.X_test, ds.y_test).accuracy == res.accuracy


def test_second_run_and_sweep_are_served_from_cache(first, monkeypatch):
    res, cache = first

    def no_training(*a, **k):
        raise AssertionError("trained again although the result was cached")

    monkeypatch.setattr(pipeline_mod, "fit", no_training)
    again = run(Recipe(**FAST), cache=cache)
    assert again.cached and again.accuracy == res.accuracy and again.latency_ort_b1 == res.latency_ort_b1
    assert [r.cached for r in sweep([Recipe(**FAST)] * 2, cache=cache)] == [True, True]
    with pytest.raises(AssertionError, match="trained again"):
        run(Recipe(**FAST).replace(seed=1), cache=cache)


def test_keys_depend_on_recipe_model_and_data(first, tmp_path):
    res, cache = first
    other = run(Recipe(**FAST).replace(epochs=1), cache=cache, progress=False)
    assert other.key != res.key and not other.cached
    ds = load("digits")
    shifted = type(ds)(**{**{f: getattr(ds, f) for f in ds.__dataclass_fields__}, "X_test": ds.X_test + 1e-3})
    assert run(Recipe(**FAST), data=shifted, cache=cache, progress=False).key != res.key


def test_damaged_cache_entry_is_recomputed(first):
    res, cache = first
    (cache / "results" / res.key / "result.json").write_text("{ truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run(Recipe(**FAST), cache=cache, progress=False)
    assert any("damaged cache entry" in str(w.message) for w in caught)
    assert not again.cached and again.accuracy == res.accuracy
    assert Result.from_dict(json.loads((cache / "results" / res.key / "result.json").read_text())).key == res.key
    assert not [p for p in (cache / "results").iterdir() if p.name.startswith(".")], "no temporary folders left"


def test_run_on_your_own_model(tmp_path):
    mine = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    res = run(Recipe(**FAST), model=mine, cache=tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in mine.state_dict().items()), "the caller's model is untouched"
    assert res.params == 64 * 16 + 16 + 16 * 10 + 10 and res.onnx_top1_agreement == 1.0
    trained = res.load_model(into=nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)))
    ds = load("digits")
    assert evaluate(trained, ds.X_test, ds.y_test).accuracy == res.accuracy
    with torch.no_grad():
        mine[1].weight.add_(1.0)
    assert run(Recipe(**FAST), model=mine, cache=tmp_path, progress=False).key != res.key
    with pytest.raises(WorkbenchError, match="torch.nn.Module"):
        run(Recipe(**FAST), model="resnet", cache=tmp_path)


PRUNE = dict(FAST, model_options={"hidden": [32, 16]})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(prune_amount=1.0), r"prune_amount must be a fraction in \[0, 1\)"),
        (dict(prune_amount=0.5, prune_kind="random"), "prune_kind must be one of unstructured, structured"),
        (dict(prune_amount=0.5, prune_kind="structured", prune_schedule="gradual"), "structured pruning is one-shot"),
        (dict(prune_amount=0.5, finetune_lr=-1.0), "finetune_lr must be a finite number > 0"),
    ],
)
def test_bad_pruning_settings(changes, message):
    with pytest.raises(WorkbenchError, match=message):
        Recipe(**(PRUNE | changes))


def test_dense_resets_every_compression_setting():
    r = Recipe(**PRUNE, prune_amount=0.5, prune_kind="structured", finetune_epochs=2, prune_exclude=["net.1"])
    assert r.compressed and not r.dense().compressed
    assert r.dense() == Recipe(**PRUNE)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_unstructured_pruning_step_reuses_the_cached_dense_model(tmp_path, monkeypatch):
    dense = run(Recipe(**PRUNE), cache=tmp_path, progress=False)
    calls = []
    real_fit = pipeline_mod.fit
    monkeypatch.setattr(pipeline_mod, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    pruned = run(Recipe(**PRUNE, prune_amount=0.7, finetune_epochs=1), cache=tmp_path, progress=False)
    assert calls == [], "the dense model came from the cache; only fine-tuning (in prune) trained"
    assert pruned.dense_accuracy == dense.accuracy
    assert pruned.sparsity == pytest.approx(0.7, abs=2e-3)
    assert pruned.params == dense.params and pruned.nonzero_params < 0.4 * dense.params
    # Masks are gone, zeros stay: the checkpoint is a plain model with the same sparsity.
    model = pruned.load_model()
    assert not any("weight_mask" in dict(m.named_buffers()) for m in model.modules())
    assert pruned.sparse_bytes["bitmask"] < pruned.sparse_bytes["dense"]
    # Unstructured zeros do not shrink the ONNX file: the tensors keep their shape.
    assert abs(pruned.size_onnx_bytes - dense.size_onnx_bytes) < 0.02 * dense.size_onnx_bytes


def test_runs_differing_only_in_measurement_share_the_trained_weights(tmp_path, monkeypatch):
    defaults = Recipe()  # the twin a run looks for has the default measurement settings
    measured = run(Recipe(**{**PRUNE, "latency_repeats": defaults.latency_repeats}), cache=tmp_path, progress=False)
    monkeypatch.setattr(pipeline_mod, "fit", lambda *a, **k: pytest.fail("trained again"))
    lean = run(Recipe(**PRUNE, export_onnx=False), cache=tmp_path, progress=False)
    assert not lean.cached and lean.onnx_path is None and lean.accuracy == measured.accuracy
    assert lean.history == measured.history and lean.train_seconds >= measured.train_seconds
    a, b = measured.load_model().state_dict(), lean.load_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and a compressed run built on the lean recipe starts from those weights too.
    pruned = run(Recipe(**PRUNE, export_onnx=False, prune_amount=0.5), cache=tmp_path, progress=False)
    assert pruned.dense_accuracy == measured.accuracy


def test_structured_pruning_step_shrinks_the_model_and_reloads(tmp_path):
    dense = run(Recipe(**PRUNE), cache=tmp_path, progress=False)
    small = run(Recipe(**PRUNE, prune_amount=0.5, prune_kind="structured", finetune_epochs=1), cache=tmp_path,
                progress=False)
    assert small.params == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    assert small.macs < dense.macs and small.size_onnx_bytes < 0.6 * dense.size_onnx_bytes
    assert small.onnx_top1_agreement == 1.0
    model = small.load_model()
    ds = load("digits")
    assert evaluate(model, ds.X_test, ds.y_test).accuracy == small.accuracy


def test_sensitivity_scope_derives_per_layer_amounts(tmp_path):
    r = run(Recipe(**PRUNE, prune_amount=0.9, prune_scope="sensitivity", finetune_epochs=1), cache=tmp_path,
            progress=False)
    amounts = r.steps["prune"].amounts
    assert set(amounts) == set(r.layer_sparsity) and all(0 <= a <= 0.9 for a in amounts.values())
    for name, a in amounts.items():
        assert r.layer_sparsity[name] == pytest.approx(a, abs=0.01)
    with pytest.raises(WorkbenchError, match="one-shot"):
        Recipe(**PRUNE, prune_amount=0.9, prune_scope="sensitivity", prune_schedule="gradual")


def test_quantization_step_measures_packed_size_and_reloads(tmp_path):
    fp32 = run(Recipe(**PRUNE), cache=tmp_path, progress=False)
    q = run(Recipe(**PRUNE, weight_bits=4, act_bits=8, qat_epochs=1), cache=tmp_path, progress=False)
    assert q.recipe.dense() == fp32.recipe and q.dense_accuracy == fp32.accuracy
    assert set(q.layer_sqnr) == {"net.1", "net.3", "net.5"} and all(v > 10 for v in q.layer_sqnr.values())
    assert q.size_quantized_bytes < fp32.size_state_dict_bytes / 4
    assert q.steps["quantize"].qat["train_loss"] and q.history == {}
    model = q.load_model()
    ds = load("digits")
    assert evaluate(model, ds.X_test, ds.y_test).accuracy == q.accuracy
    assert q.onnx_top1_agreement is not None and q.onnx_top1_agreement > 0.99


@pytest.mark.parametrize(
    ("changes", "message"),
    [(dict(weight_bits=17), "1..16"), (dict(weight_bits=1), "1-bit symmetric"),
     (dict(weight_bits=8, quant_granularity="per-row"), "unknown granularity"),
     (dict(weight_bits=8, calibration="kl"), "unknown calibration"), (dict(qat_epochs=2), "needs quantization")],
)
def test_bad_quantization_settings(changes, message):
    with pytest.raises(WorkbenchError, match=message):
        Recipe(**(PRUNE | changes))


def test_deep_compression_step_reports_the_encoded_size(tmp_path):
    r = run(Recipe(**PRUNE, prune_amount=0.8, finetune_epochs=1, share_bits=3, share_epochs=1), cache=tmp_path,
            progress=False)
    assert r.size_encoded_bytes == r.steps["share"].encoded_bytes
    assert r.recipe.active_steps() == ("train", "measure", "finetune", "prune", "share")
    assert r.size_encoded_bytes < r.sparse_bytes["relative"] < r.sparse_bytes["dense"]
    model = r.load_model()
    for layer in (model.net[1], model.net[3]):
        assert len(torch.unique(layer.weight[layer.weight != 0])) <= 2 ** 3
    with pytest.raises(WorkbenchError, match="not both"):
        Recipe(**PRUNE, share_bits=4, weight_bits=8)
    with pytest.raises(WorkbenchError, match="set share_bits"):
        Recipe(**PRUNE, share_epochs=2)


def test_a_quantized_checkpoint_whose_weights_do_not_fit_gets_one_clear_error(tmp_path):
    from workbench.recipe import load_model

    q = run(Recipe(**FAST, export_onnx=False, weight_bits=8, act_bits=8), cache=tmp_path, progress=False)
    payload = torch.load(q.checkpoint_path, weights_only=True)
    payload["spec"]["options"]["hidden"] = [16]  # the weights are 32 wide
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(WorkbenchError, match="quantized weights do not fit model 'mlp'") as info:
        load_model(bad)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(WorkbenchError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    ds = load("digits")
    assert evaluate(load_model(q.checkpoint_path), ds.X_test, ds.y_test).correct == q.test_correct

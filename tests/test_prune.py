"""Pruning: masks against torch.nn.utils.prune, persistence, schedules, scans, structured rebuilds."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from workbench import WorkbenchError, build, load, measure
from workbench import onnx as wonnx
from workbench import prune

SHAPES = {"mlp": (1, 8, 8), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "cnn": (1, 8, 8)}


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.55, 0.9])
@pytest.mark.parametrize("name", ["lenet5", "cnn"])
def test_layer_masks_equal_torch_l1_unstructured(name, amount):
    model = build(name, input_shape=SHAPES[name], num_classes=10, seed=2)
    masks = prune.magnitude_masks(model, amount, scope="layer")
    for layer_name, mask in masks.items():
        ref = copy.deepcopy(model.get_submodule(layer_name))
        torch_prune.l1_unstructured(ref, "weight", amount=amount)
        assert torch.equal(mask, ref.weight_mask), layer_name


@pytest.mark.parametrize("amount", [0.2, 0.8, 0.95])
def test_global_masks_equal_torch_global_unstructured(amount):
    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10, seed=3)
    masks = prune.magnitude_masks(model, amount, scope="global")
    ref = copy.deepcopy(model)
    torch_prune.global_unstructured([(ref.get_submodule(n), "weight") for n in masks],
                                    pruning_method=torch_prune.L1Unstructured, amount=amount)
    for n, mask in masks.items():
        assert torch.equal(mask, ref.get_submodule(n).weight_mask), n
    # Global scope prunes layers unevenly (the big fc layer loses most), layer scope evenly.
    per_layer = {n: 1 - float(m.mean()) for n, m in masks.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05


def test_per_layer_amounts_and_exclusions():
    model = build("lenet300", input_shape=(1, 28, 28), num_classes=10)
    names = list(prune.prunable_layers(model))
    masks = prune.magnitude_masks(model, {names[0]: 0.5, names[1]: 0.25})
    assert float(1 - masks[names[0]].mean()) == pytest.approx(0.5, abs=1e-3)
    assert float(1 - masks[names[1]].mean()) == pytest.approx(0.25, abs=1e-3)
    assert float(masks[names[2]].mean()) == 1.0
    masks = prune.magnitude_masks(model, 0.5, exclude_first=True, exclude_last=True)
    assert list(masks) == [names[1]]


def test_masks_persist_through_fine_tuning_and_finalize_leaves_plain_zeros(digits):
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=(32,))
    prune.apply_masks(model, prune.magnitude_masks(model, 0.7, scope="global"))
    zeros = {n: (m.weight == 0).clone() for n, m in prune.prunable_layers(model).items()}
    prune.fine_tune(model, digits, epochs=2, lr=1e-2, progress=False)  # Adam would move unmasked zeros
    for n, m in prune.prunable_layers(model).items():
        assert torch.all(m.weight[zeros[n]] == 0), n
    assert prune.sparsity(model) == pytest.approx(0.7, abs=1e-3)
    prune.finalize(model)
    assert not any("weight_mask" in dict(m.named_buffers()) for m in model.modules())
    assert prune.sparsity(model) == pytest.approx(0.7, abs=1e-3)
    assert set(model.state_dict()) == set(build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(32,)).state_dict())


def test_zhu_gupta_schedule_closed_form():
    final, n = 0.9, 4
    values = [prune.zhu_gupta_sparsity(t, final=final, steps=n) for t in range(n + 2)]
    expected = [final * (1 - (1 - t / n) ** 3) for t in range(n + 1)] + [final]
    assert values == pytest.approx(expected)
    assert prune.zhu_gupta_sparsity(-3, final=final, steps=n, initial=0.1) == pytest.approx(0.1)
    assert prune.zhu_gupta_sparsity(7, final=0.5, begin=5, steps=2, interval=2) == pytest.approx(0.5 - 0.5 * 0.5 ** 3)


def test_gradual_pruning_reaches_the_target(digits):
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=(32,))
    rows = prune.gradual_prune(model, digits, final=0.8, steps=3, epochs_per_step=1, progress=False)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["target"] == pytest.approx(0.8) and rows[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert rows[0]["sparsity"] < rows[1]["sparsity"] < rows[2]["sparsity"]


def test_sensitivity_scan_and_derived_amounts(digits):
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=(32,))
    prune.fine_tune(model, digits, epochs=3, lr=3e-3, progress=False)
    before = copy.deepcopy(model.state_dict())
    scan = prune.sensitivity_scan(model, digits, amounts=(0.0, 0.5, 0.9))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "scan must restore the weights"
    assert set(scan.accuracy) == set(prune.prunable_layers(model))
    assert all(accs[0] == scan.base_accuracy for accs in scan.accuracy.values())
    amounts = prune.amounts_from_scan(scan, max_drop=1.0)
    assert set(amounts.values()) == {0.9}
    assert set(prune.amounts_from_scan(scan, max_drop=-1.0).values()) == {0.0}
    assert len(scan.rows()) == len(scan.accuracy) and "90%" in scan.rows()[0]


def _hand_cnn_counts(c1, c2, hidden, side=8, classes=10):
    h = side // 4
    params = (1 * 9 * c1) + 2 * c1 + (c1 * 9 * c2) + 2 * c2 + (c2 * h * h * hidden + hidden) + hidden * classes + classes
    macs = c1 * side * side * 9 + c2 * (side // 2) ** 2 * c1 * 9 + c2 * h * h * hidden + hidden * classes
    return params, macs


@pytest.mark.parametrize(
    ("name", "hand"),
    [
        ("lenet300", lambda: (784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10, 784 * 150 + 150 * 50 + 50 * 10)),
        ("lenet5", lambda: ((25 * 10 + 10) + (10 * 25 * 25 + 25) + (25 * 16 * 250 + 250) + (250 * 10 + 10),
                            10 * 24 * 24 * 25 + 25 * 8 * 8 * 250 + 400 * 250 + 2500)),
        ("cnn", lambda: _hand_cnn_counts(16, 32, 64)),
    ],
)
def test_structured_pruning_counts_match_hand_computation(name, hand):
    model = build(name, input_shape=SHAPES[name], num_classes=10)
    small = prune.channel_prune(model, 0.5, input_shape=SHAPES[name])
    params, macs = hand()
    assert measure.count_params(small) == params
    assert measure.macs(small, SHAPES[name]).total == macs
    assert small(torch.randn(2, *SHAPES[name])).shape == (2, 10)


@pytest.mark.parametrize("name", list(SHAPES))
def test_removing_zero_channels_changes_nothing_and_exports(name, tmp_path):
    shape = SHAPES[name]
    model = build(name, input_shape=shape, num_classes=10, seed=5)
    if name == "cnn":  # real BN statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(64, *shape))
        model.eval()
    layers = list(prune.prunable_layers(model).items())[:-1]
    with torch.no_grad():  # make half of each layer's channels exactly dead (weights, bias, BN shift)
        for layer_name, layer in layers:
            dead = torch.arange(0, layer.weight.shape[0], 2)
            layer.weight[dead] = 0
            if layer.bias is not None:
                layer.bias[dead] = 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                dead = torch.arange(0, m.num_features, 2)
                m.bias[dead] = 0
                m.running_mean[dead] = 0
    small = prune.channel_prune(model, 0.5, input_shape=shape)  # L1 ranks the dead channels last
    x = torch.randn(16, *shape)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    path = wonnx.export(small, tmp_path / "small.onnx", input_shape=shape)
    p = wonnx.parity(small, path, x)
    assert p.max_abs_err <= 1e-4 and p.top1_agreement == 1.0


def test_importance_is_swappable():
    model = build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8,))
    first = model.net[1]
    with torch.no_grad():
        first.weight.zero_()
        first.weight[:4] = 1.0  # channels 0-3: L1 norm 64, largest entry 1
        first.weight[4:, 0] = 10.0  # channels 4-7: L1 norm 10, largest entry 10
    by_l1 = prune.channel_prune(model, 0.5, input_shape=(1, 8, 8))
    by_max = prune.channel_prune(model, 0.5, input_shape=(1, 8, 8),
                                 importance=lambda w: w.abs().reshape(w.shape[0], -1).amax(1))
    assert torch.equal(by_l1.net[1].weight, first.weight[:4])
    assert torch.equal(by_max.net[1].weight, first.weight[4:])
    with pytest.raises(WorkbenchError, match="one score per output channel"):
        prune.channel_prune(model, 0.5, input_shape=(1, 8, 8), importance=lambda w: w.sum())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: prune.magnitude_masks(m, 1.0), r"in \[0, 1\)"),
        (lambda m: prune.magnitude_masks(m, -0.1), r"in \[0, 1\)"),
        (lambda m: prune.magnitude_masks(m, {"net.9": 0.5}), "unknown layer name.*net.9.*prunable layers: net.1"),
        (lambda m: prune.magnitude_masks(m, 0.5, scope="row"), "unknown pruning scope"),
        (lambda m: prune.magnitude_masks(m, {"net.1": 0.5}, scope="global"), "need scope='layer'"),
        (lambda m: prune.magnitude_masks(m, 0.5, exclude=("fc",)), "unknown layer"),
        (lambda m: prune.channel_prune(m, 0.97, input_shape=(1, 8, 8)), "would remove all of them"),
        (lambda m: prune.channel_prune(m, {"net.3": 0.5}, input_shape=(1, 8, 8)), "the last layer's outputs"),
        (lambda m: prune.magnitude_masks(nn.Sequential(nn.ReLU()), 0.5), "no prunable layers"),
        (lambda m: prune.channel_prune(build("vit", input_shape=(1, 8, 8), num_classes=10), 0.5, input_shape=(1, 8, 8)),
         "cannot see through"),
    ],
)
def test_bad_input_is_named(call, message):
    model = build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,))
    with pytest.raises(WorkbenchError, match=message):
        call(model)


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = self.a(x)
            return self.b(x)

    with pytest.raises(WorkbenchError, match="could not trace Branchy") as info:
        prune.channel_prune(Branchy(), 0.5, input_shape=(4,))
    assert info.value.__cause__ is not None  # torch.fx's own error stays attached

"""The model zoo: shapes, parameter counts from the papers, options, checkpoints."""

import pytest
import torch
from torch import nn

from workbench import WorkbenchError, models

SHAPES = {"mlp": (1, 8, 8), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "cnn": (1, 8, 8), "cnn1d": (1, 1, 40),
          "vit": (1, 8, 8)}


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("num_classes", [10, 3])
def test_forward_shape_for_each_model(name, num_classes):
    shape = SHAPES[name]
    model = models.build(name, input_shape=shape, num_classes=num_classes)
    assert model(torch.randn(5, *shape)).shape == (5, num_classes)
    assert not model.training


@pytest.mark.parametrize("name", ["cnn", "vit", "mlp"])
def test_models_adapt_to_rgb_32x32(name):
    model = models.build(name, input_shape=(3, 32, 32), num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_parameter_counts_match_the_papers():
    # Deep Compression Table 1: LeNet-300-100 has 267K weights (1070 KB), LeNet-5 431K (1720 KB).
    lenet300 = models.build("lenet300", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in lenet300.parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    lenet5 = models.build("lenet5", input_shape=(1, 28, 28), num_classes=10)
    hand = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert sum(p.numel() for p in lenet5.parameters()) == hand == 431_080


def test_cnn_batchnorm_switch():
    with_bn = models.build("cnn", input_shape=(1, 8, 8), num_classes=10)
    without = models.build("cnn", input_shape=(1, 8, 8), num_classes=10, batchnorm=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    # Convs before BN carry no bias (BN's shift replaces it); without BN they need one.
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = models.build("vit", input_shape=(1, 8, 8), num_classes=10, seed=3)
    b = models.build("vit", input_shape=(1, 8, 8), num_classes=10, seed=3)
    c = models.build("vit", input_shape=(1, 8, 8), num_classes=10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="resnet"), "unknown model 'resnet'; known models: mlp, lenet300, lenet5, cnn, cnn1d, vit"),
        (dict(name="lenet5", input_shape=(1, 8, 8)), "at least 16x16"),
        (dict(name="cnn", batchnorn=False), "unknown option.*batchnorn.*allowed: batchnorm"),
        (dict(name="lenet300", dropout=0.1), "allowed: hidden"),
        (dict(name="vit", patch_size=3), "must divide"),
        (dict(name="mlp", input_shape=(8, 8)), "input_shape must be"),
        (dict(name="mlp", num_classes=1), "at least 2"),
    ],
)
def test_bad_build_arguments_say_what_is_wrong(kwargs, message):
    args = dict(input_shape=(1, 8, 8), num_classes=10) | kwargs
    with pytest.raises(WorkbenchError, match=message):
        models.build(args.pop("name"), **args)


def test_checkpoint_round_trip(tmp_path):
    model = models.build("cnn", input_shape=(1, 8, 8), num_classes=10, batchnorm=False, channels=(8, 16))
    spec = {"name": "cnn", "input_shape": (1, 8, 8), "num_classes": 10,
            "options": {"batchnorm": False, "channels": (8, 16)}}
    path = models.save_checkpoint(tmp_path / "m.pt", model, spec=spec, metadata={"accuracy": 0.5})
    loaded, info = models.load_checkpoint(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert info["metadata"] == {"accuracy": 0.5} and info["spec"]["options"]["channels"] == (8, 16)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_load_checkpoint_refuses_bad_files(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        models.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(WorkbenchError, match="not a PyTorch file at all"):
        models.load_checkpoint(tmp_path / "notes.txt")
    torch.save(models.build("mlp", input_shape=(1, 8, 8), num_classes=10).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(WorkbenchError, match="not a workbench checkpoint"):
        models.load_checkpoint(tmp_path / "sd.pt")
    # A pickle that runs code when loaded: weights_only=True refuses it before anything runs.
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(WorkbenchError, match="weights_only.*could run code"):
        models.load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [("mlp", (1, 8, 8), {"hidden": (40, 20)}), ("lenet300", (1, 28, 28), {"hidden": (150, 50)}),
     ("lenet5", (1, 28, 28), {"channels": (10, 25), "hidden": 250}), ("cnn", (1, 8, 8), {"channels": (16, 32), "hidden": 64}),
     ("cnn1d", (1, 1, 40), {"channels": (8, 16), "hidden": 24}), ("mlp", (1, 1, 40), {"hidden": ()})],
)
def test_width_options_rebuild_the_same_shapes(name, shape, options):
    model = models.build(name, input_shape=shape, num_classes=10, **options)
    assert models.width_options(model) == options
    again = models.build(name, input_shape=shape, num_classes=10, **models.width_options(model))
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [("mlp", (1, 8, 8), {}), ("mlp", (3, 32, 32), {"hidden": (40, 20, 10), "dropout": 0.1}),
     ("lenet300", (1, 28, 28), {}), ("lenet5", (1, 28, 28), {}), ("lenet5", (3, 32, 32), {"channels": (6, 16)}),
     ("cnn", (1, 8, 8), {}), ("cnn", (3, 32, 32), {"batchnorm": False, "channels": (8, 16, 32), "hidden": 20}),
     ("cnn1d", (1, 1, 40), {}), ("cnn1d", (2, 1, 37), {"channels": (4, 8), "kernel_size": 3, "hidden": 10}),
     ("cnn1d", (1, 8, 8), {}), ("mlp", (1, 1, 40), {"hidden": ()}),
     ("vit", (1, 8, 8), {}),
     ("vit", (3, 32, 32), {"patch_size": 8, "dim": 48, "depth": 3, "heads": 6, "mlp_ratio": 3})],
)
def test_param_count_matches_the_built_model(name, shape, options):
    model = models.build(name, input_shape=shape, num_classes=7, **options)
    expected = sum(p.numel() for p in model.parameters())
    assert models.param_count(name, input_shape=shape, num_classes=7, **options) == expected


@pytest.mark.parametrize(
    ("name", "options", "asked"),
    [("mlp", {"hidden": (200_000, 200_000)}, "40,015,200,010"), ("cnn", {"channels": (100_000, 100_000)}, ""),
     ("vit", {"depth": 10 ** 9}, ""), ("lenet5", {"hidden": 10 ** 12}, "")],
)
def test_build_refuses_huge_models_before_allocating(name, options, asked):
    shape = SHAPES[name]
    with pytest.raises(WorkbenchError, match=f"{asked}.*parameters; the limit is {models.MAX_PARAMS:,}"):
        models.build(name, input_shape=shape, num_classes=10, **options)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [("mlp", {"hidden": "foo"}, "hidden must be a list of positive integers"),
     ("mlp", {"hidden": 1e30}, "hidden must be a list of positive integers"),
     ("mlp", {"hidden": (16.5,)}, "hidden must be a list of positive integers"),
     ("mlp", {"hidden": (True,)}, "hidden must be a list of positive integers"),
     ("mlp", {"dropout": "half"}, "dropout must be a number in"),
     ("cnn", {"batchnorm": "maybe"}, "batchnorm must be true or false"),
     ("cnn", {"hidden": 0}, "hidden must be a positive integer"),
     ("lenet5", {"channels": (1, 2, 3)}, "channels must be a list of 2 positive integers"),
     ("lenet300", {"hidden": ()}, "hidden must be a list of positive integers"),
     ("cnn1d", {"channels": ()}, "channels must be a list of positive integers"),
     ("cnn1d", {"kernel_size": 4}, "kernel_size must be odd"),
     ("cnn1d", {"channels": (8, 8, 8, 8, 8, 8)}, "length at least 64"),
     ("vit", {"depth": -1}, "depth must be a positive integer"),
     ("vit", {"patch_size": "4"}, "patch_size must be a positive integer")],
)
def test_bad_option_values_say_what_is_expected(name, options, message):
    with pytest.raises(WorkbenchError, match=message):
        models.build(name, input_shape=SHAPES[name], num_classes=10, **options)


def test_load_checkpoint_names_what_is_missing_or_wrong(tmp_path):
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,))
    spec = {"name": "mlp", "input_shape": (1, 8, 8), "num_classes": 10, "options": {"hidden": (16,)}}
    path = models.save_checkpoint(tmp_path / "m.pt", model, spec=spec)
    payload = torch.load(path, weights_only=True)
    for key in ("name", "input_shape", "num_classes"):
        torch.save({**payload, "spec": {k: v for k, v in payload["spec"].items() if k != key}}, tmp_path / "bad.pt")
        with pytest.raises(WorkbenchError, match=f"spec has no '{key}'"):
            models.load_checkpoint(tmp_path / "bad.pt")
    torch.save({k: v for k, v in payload.items() if k != "state_dict"}, tmp_path / "bad.pt")
    with pytest.raises(WorkbenchError, match="has no 'state_dict'"):
        models.load_checkpoint(tmp_path / "bad.pt")
    torch.save({**payload, "spec": {**payload["spec"], "options": {"hidden": [200_000, 200_000]}}}, tmp_path / "bad.pt")
    with pytest.raises(WorkbenchError, match="40,015,200,010 parameters"):
        models.load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(WorkbenchError, match="is a folder"):
        models.load_checkpoint(tmp_path)
    with pytest.raises(WorkbenchError, match="empty"):
        models.load_checkpoint("")


def test_cnn1d_is_a_small_row_convolution_network():
    model = models.build("cnn1d", input_shape=(1, 1, 40), num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(m.kernel_size == (1, 5) and m.padding == (0, 2) for m in convs)
    n = sum(p.numel() for p in model.parameters())
    hand = (1 * 32 * 5 + 32) + 2 * (32 * 32 * 5 + 32) + (32 * 5 * 64 + 64) + (64 * 10 + 10)
    assert n == hand == 21_450 and n < 25_000
    # Each output depends on a window of the signal only (a convolution): changing the last samples
    # leaves the first block's first outputs unchanged.
    x = torch.randn(2, 1, 1, 40)
    y = x.clone()
    y[..., 30:] += 1.0
    with torch.no_grad():
        assert torch.equal(model.features[0](x)[..., :20], model.features[0](y)[..., :20])


def test_mlp_without_hidden_layers_is_logistic_regression():
    model = models.build("mlp", input_shape=(1, 1, 40), num_classes=10, hidden=[])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 40 and not any(isinstance(m, nn.ReLU) for m in model.modules())
    x = torch.randn(3, 1, 1, 40)
    with torch.no_grad():
        assert torch.allclose(model(x), x.flatten(1) @ linears[0].weight.T + linears[0].bias)

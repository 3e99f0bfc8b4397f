"""BN folding against torch.nn.utils.fusion, on layers and on the zoo CNN; ONNX parity; bad input."""

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from workbench import WorkbenchError, build, fold
from workbench import onnx as wonnx

GEN = torch.Generator().manual_seed(0)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=GEN))
        bn.running_var.copy_(torch.rand(n, generator=GEN) * 2 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=GEN))
            bn.bias.copy_(torch.randn(n, generator=GEN))
    bn.eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("conv", "bn", "shape"), [
    (lambda b: nn.Conv2d(3, 8, 3, padding=1, bias=b), nn.BatchNorm2d, (4, 3, 12, 12)),
    (lambda b: nn.Conv1d(3, 6, 5, bias=b), nn.BatchNorm1d, (4, 3, 20)),
    (lambda b: nn.Conv2d(4, 8, 3, groups=2, stride=2, bias=b), nn.BatchNorm2d, (2, 4, 9, 9)),
])
def test_conv_bn_matches_torch_fusion(conv, bn, shape, bias, affine):
    c = conv(bias).eval()
    b = bn(c.out_channels, affine=affine)
    _randomize_bn(b)
    ours = fold.fold_conv_bn(c, b)
    ref = fuse_conv_bn_eval(c, b)
    x = torch.randn(*shape, generator=GEN)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5
        assert (ours(x) - b(c(x))).abs().max() <= 1e-5
    assert torch.allclose(ours.weight, ref.weight, atol=1e-6) and torch.allclose(ours.bias, ref.bias, atol=1e-6)
    assert c.bias is None or not torch.equal(c.bias, ours.bias)  # the inputs were not modified


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_matches_torch_fusion(bias):
    lin = nn.Linear(20, 16, bias=bias).eval()
    b = nn.BatchNorm1d(16)
    _randomize_bn(b)
    x = torch.randn(7, 20, generator=GEN)
    ours, ref = fold.fold_linear_bn(lin, b), fuse_linear_bn_eval(lin, b)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5
        assert (ours(x) - b(lin(x))).abs().max() <= 1e-5


def _cnn_with_stats() -> nn.Module:
    model = build("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
    return model.eval()


def test_zoo_cnn_folds_into_the_cnn_without_bn(tmp_path):
    model = _cnn_with_stats()
    folded = fold.fold_bn(model)
    assert fold.batchnorm_layers(model) and not fold.batchnorm_layers(folded)
    x = torch.randn(16, 1, 28, 28, generator=GEN)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-5
    # Its shape is exactly the zoo's cnn without BN (so checkpoints rebuild it).
    plain = build("cnn", input_shape=(1, 28, 28), num_classes=10, batchnorm=False)
    plain.load_state_dict(folded.state_dict())
    # The folded model exports and ORT reproduces it.
    path = wonnx.export(folded, tmp_path / "folded.onnx", input_shape=(1, 28, 28))
    p = wonnx.parity(folded, path, x)
    assert p.max_abs_err <= 1e-4 and p.top1_agreement == 1.0


def test_fold_in_a_sequential_root_and_nested():
    inner = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.ReLU(), nn.Flatten())
    model = nn.Sequential(nn.Unflatten(1, (1, 8)), inner, nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 3))
    _randomize_bn(inner[1])
    _randomize_bn(model[3])
    x = torch.randn(5, 8, generator=GEN)
    folded = fold.fold_bn(model.eval())
    assert len(folded) == 5 and len(folded[1]) == 3 and not fold.batchnorm_layers(folded)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-5


def test_inplace_and_copy():
    model = _cnn_with_stats()
    copy_ = fold.fold_bn(model)
    assert copy_ is not model and fold.batchnorm_layers(model)
    same = fold.fold_bn(model, inplace=True)
    assert same is model and not fold.batchnorm_layers(model)


class _BNFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(x))


def test_unfoldable_bn_warns_or_raises():
    with pytest.warns(UserWarning, match="could not be folded"):
        out = fold.fold_bn(_BNFirst())
    assert fold.batchnorm_layers(out) == ["bn"]
    with pytest.raises(WorkbenchError, match="1 BatchNorm layer\\(s\\) could not be folded \\(bn\\)"):
        fold.fold_bn(_BNFirst(), strict=True)


def test_bad_input():
    with pytest.raises(WorkbenchError, match="track_running_stats=False"):
        fold.fold_conv_bn(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(WorkbenchError, match="BatchNorm has 3 features but the layer before it has 2"):
        fold.fold_conv_bn(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(3))
    with pytest.raises(WorkbenchError, match="needs a Conv1d/2d/3d layer, got Linear"):
        fold.fold_conv_bn(nn.Linear(2, 2), nn.BatchNorm2d(2))
    with pytest.raises(WorkbenchError, match="needs an nn.Linear layer"):
        fold.fold_linear_bn(nn.Conv2d(1, 2, 3), nn.BatchNorm1d(2))
    with pytest.raises(WorkbenchError, match="needs a torch.nn.Module"):
        fold.fold_bn("model.pt")


def test_recipe_fold_bn_measures_the_folded_model(tmp_path):
    from workbench import Recipe, run
    from workbench.recipe import load_model

    base = Recipe(model="cnn", dataset="digits", epochs=2, latency_repeats=5, model_options={"channels": [8, 16]})
    dense = run(base, cache=tmp_path, progress=False)
    res = run(base.replace(fold_bn=True), cache=tmp_path, progress=False)
    assert res.steps["fold_bn"].folded == ["features.1", "features.5"]
    # Folding moves logits by float32 rounding (~1e-6): a prediction can only change on a test image
    # whose top two logits are closer than that, on any CPU. Count such near-ties with room (1e-4).
    from workbench.data import load
    from workbench.train import predict

    ds = load("digits")
    top2 = predict(dense.load_model(), ds.X_test).topk(2, dim=1).values
    near_ties = int(((top2[:, 0] - top2[:, 1]) < 1e-4).sum())
    assert abs(res.test_correct - dense.test_correct) <= near_ties
    assert res.params < dense.params  # BN's gamma and beta are gone (conv biases added)
    model = load_model(res.checkpoint_path)
    assert not fold.batchnorm_layers(model) and res.onnx_top1_agreement == 1.0
    assert base.replace(fold_bn=True).dense() == base

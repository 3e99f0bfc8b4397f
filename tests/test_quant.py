"""Quantization: the affine math against torch's kernels, STE, calibration, PTQ/QAT, integer reference."""

import math

import pytest
import torch
from torch import nn

from workbench import WorkbenchError, build, load, quant
from workbench.models import MODELS

GEN = torch.Generator().manual_seed(0)


def _x(*shape, scale=3.0):
    return torch.randn(*shape, generator=GEN) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_fake_quant_is_bit_exact_with_torch(bits, symmetric):
    x = _x(64, 3, 5, 5)
    qp = quant.compute_qparams(x, bits=bits, symmetric=symmetric)
    ref = torch.fake_quantize_per_tensor_affine(x, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
    assert torch.equal(quant.fake_quantize(x, qp), ref)
    assert torch.equal(quant.dequantize(quant.quantize(x, qp), qp), ref)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize(("symmetric", "axis"), [(True, 0), (False, 0), (True, 1), (False, 3)])
def test_per_channel_fake_quant_is_bit_exact_with_torch(bits, symmetric, axis):
    x = _x(16, 8, 3, 3)
    qp = quant.compute_qparams(x, bits=bits, symmetric=symmetric, axis=axis)
    ref = torch.fake_quantize_per_channel_affine(x, qp.scale, qp.zero_point.to(torch.int32), axis, qp.qmin, qp.qmax)
    assert torch.equal(quant.fake_quantize(x, qp), ref)


def test_formulas_by_hand():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    asym = quant.compute_qparams(x, bits=8, symmetric=False)
    assert float(asym.scale) == pytest.approx(3.0 / 255)
    assert int(asym.zero_point) == round(0 - (-1.0) / (3.0 / 255))
    sym = quant.compute_qparams(x, bits=8, symmetric=True)
    assert (float(sym.scale), int(sym.zero_point), sym.qmin, sym.qmax) == (pytest.approx(2.0 / 127), 0, -128, 127)
    # 0 is exactly representable, even when the data range excludes it
    pos = quant.compute_qparams(torch.tensor([1.0, 3.0]), bits=4, symmetric=False)
    assert float(quant.fake_quantize(torch.zeros(1), pos)) == 0.0
    assert quant.qrange(1, symmetric=False) == (0, 1) and quant.qrange(16, symmetric=True) == (-32768, 32767)


def test_per_group_uses_one_scale_per_group():
    w = _x(4, 32)
    w[0, :16] *= 100  # one group of huge values must not spoil the others
    qp = quant.compute_qparams(w, bits=4, symmetric=True, axis=0, group_size=16)
    assert qp.scale.shape == (4, 2)
    err_group = (quant.fake_quantize(w, qp) - w)[0, 16:].abs().max()
    err_channel = (quant.fake_quantize(w, quant.compute_qparams(w, bits=4, axis=0)) - w)[0, 16:].abs().max()
    assert err_group < err_channel / 10
    for g in range(2):  # each group equals per-tensor quantization of that group alone
        part = w[1, 16 * g:16 * (g + 1)]
        ref = quant.fake_quantize(part, quant.compute_qparams(part, bits=4, symmetric=True))
        assert torch.allclose(quant.fake_quantize(w, qp)[1, 16 * g:16 * (g + 1)], ref, atol=1e-6)


def test_straight_through_estimator_gradient():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    qp = quant.qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), bits=4, symmetric=False)
    quant.fake_quantize(x, qp).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(ref_x, float(qp.scale), int(qp.zero_point), 0, 15).sum().backward()
    assert torch.equal(x.grad, ref_x.grad)
    v = x.detach()
    assert x.grad[v.abs() <= 0.95].eq(1).all(), "inside the range, round() is treated as the identity"
    assert x.grad[v.abs() >= 1.2].eq(0).all(), "clamped values get no gradient"


def test_sqnr_closed_form_and_more_bits_more_sqnr():
    x = torch.tensor([3.0, 4.0])
    assert quant.sqnr(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert quant.sqnr(x, x) == math.inf
    w = _x(256, 64)
    values = [quant.sqnr(w, quant.fake_quantize(w, quant.compute_qparams(w, bits=b, axis=0))) for b in (2, 4, 8)]
    assert values[0] < values[1] < values[2]
    assert values[2] - values[1] == pytest.approx(6.02 * 4, abs=3)  # ~6 dB per bit


def test_calibration_methods():
    batches = [torch.randn(1000, generator=GEN) for _ in range(4)]
    batches[2][0] = 50.0  # one outlier
    lo, hi = quant.calibrate_range(batches, method="minmax")
    assert hi == 50.0
    assert quant.calibrate_range(batches, method="percentile", percentile=99.9)[1] < 5
    assert quant.calibrate_range(batches, method="mse", bits=4)[1] < hi
    ema_lo, ema_hi = quant.calibrate_range(batches, method="moving_average", momentum=0.5)
    assert ema_hi < hi  # one odd batch moves a moving average only partly
    # empty set: a clear error; constant set: a sane (tiny, positive) scale, no division by zero
    with pytest.raises(WorkbenchError, match="calibration set is empty"):
        quant.calibrate_range([])
    lo, hi = quant.calibrate_range([torch.full((10,), 2.0)], method="mse")
    qp = quant.qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits=8, symmetric=False)
    assert torch.isfinite(qp.scale).all() and float(qp.scale) > 0
    zero = quant.compute_qparams(torch.zeros(8), bits=8)
    assert float(zero.scale) > 0 and torch.equal(quant.fake_quantize(torch.zeros(8), zero), torch.zeros(8))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quant.qrange(0, symmetric=True), "1..16"),
        (lambda: quant.qrange(17, symmetric=False), "1..16"),
        (lambda: quant.qrange(1, symmetric=True), "1-bit symmetric"),
        (lambda: quant.compute_qparams(torch.ones(3, 4), bits=8, axis=2), "axis 2 does not exist"),
        (lambda: quant.compute_qparams(torch.ones(3, 5), bits=8, axis=0, group_size=2), "must divide"),
        (lambda: quant.calibrate_range([torch.ones(3)], method="kl"), "unknown calibration"),
        (lambda: quant.QuantConfig(granularity="per-row"), "unknown granularity"),
        (lambda: quant.compute_qparams(torch.ones(0), bits=8), "empty tensor"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(WorkbenchError, match=message):
        call()


@pytest.fixture(scope="module")
def trained_cnn():
    data = load("digits")
    model = build("cnn", input_shape=data.input_shape, num_classes=10, channels=(8, 16), hidden=32)
    from workbench.train import fit

    fit(model, data, epochs=3, progress=False)
    return model, data


def test_ptq_model_and_packed_size(trained_cnn):
    model, data = trained_cnn
    q8 = quant.quantize_model(model, quant.QuantConfig(weight_bits=8, act_bits=8), data.X_train[:256])
    assert sum(isinstance(m, quant.FakeQuantLayer) for m in q8.modules()) == 4
    out, ref = q8(data.X_test), model(data.X_test)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.97
    assert all(v > 30 for v in quant.layer_sqnr(q8).values())
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    q4 = quant.quantize_model(model, quant.QuantConfig(weight_bits=4, act_bits=0))
    channels = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    # 3 of 4 bytes saved per weight; each channel pays a 4-byte scale and a 1-byte zero point
    assert fp32 - quant.packed_bytes(q8) == weights * 3 - channels * 5
    assert quant.packed_bytes(q4) < quant.packed_bytes(q8)


def test_qat_changes_weights_and_keeps_them_trainable(trained_cnn):
    model, data = trained_cnn
    from workbench.train import fit

    q2 = quant.quantize_model(model, quant.QuantConfig(weight_bits=2, act_bits=8), data.X_train[:256])
    before = [m.layer.weight.detach().clone() for m in q2.modules() if isinstance(m, quant.FakeQuantLayer)]
    hist = fit(q2, data, epochs=1, lr=1e-3, progress=False)
    after = [m.layer.weight for m in q2.modules() if isinstance(m, quant.FakeQuantLayer)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after)), "STE must let gradients reach the weights"
    assert hist.epochs == 1 and math.isfinite(hist.train_loss[0])


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_integer_only_reference_matches_fake_quant(trained_cnn, granularity):
    model, data = trained_cnn
    q = quant.quantize_model(model, quant.QuantConfig(weight_bits=8, act_bits=8, granularity=granularity),
                             data.X_train[:256])
    inputs = quant.collect_inputs(q, data.X_test[:64])
    for name, layer in q.named_modules():
        if not isinstance(layer, quant.FakeQuantLayer):
            continue
        x = inputs[name][0]
        y = layer(x).detach()
        out_qp = quant.compute_qparams(y, bits=8, symmetric=False)
        codes = quant.int_forward(layer, x, out_qp)
        expected = quant.quantize(y, out_qp)
        diff = (codes - expected).abs()
        # The float32 error bound (any CPU, any summation order) is below one step, so two codes
        # can differ by one at most; and only where the bound reaches a rounding boundary.
        gap = quant.int_float_gap_bound(layer, x, out_qp)
        assert float(gap.max()) < 1, name
        assert diff.max() <= 1, name
        assert (diff == 0).float().mean() > 0.99, name


def test_gap_bound_covers_float64_vs_float32_on_a_random_layer():
    # The bound must cover the float32 path's real error: compare it with the same layer in float64.
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 64)
    fq = quant.quantize_model(torch.nn.Sequential(lin), quant.QuantConfig(weight_bits=8, act_bits=8),
                              torch.randn(256, 512))[0]
    x = torch.randn(128, 512) * 3
    with torch.no_grad():
        y32 = fq(x)
        x_hat = quant.fake_quantize(x, fq.act_qparams()).double()
        y64 = torch.nn.functional.linear(x_hat, fq.quantized_weight().double(), fq.layer.bias.double())
    out_qp = quant.compute_qparams(y32, bits=8, symmetric=False)
    gap = quant.int_float_gap_bound(fq, x, out_qp)
    err_steps = (y32.double() - y64).abs() / out_qp.scale.double()
    assert bool((err_steps <= gap).all()) and float(gap.max()) < 1
    codes = quant.int_forward(fq, x, out_qp)
    assert int((codes - quant.quantize(y32, out_qp)).abs().max()) <= 1


def test_activation_calibration_uses_the_asymmetric_grid_it_is_quantized_with(trained_cnn):
    model, data = trained_cnn
    X = data.X_train[:256]
    q = quant.quantize_model(model, quant.QuantConfig(weight_bits=8, act_bits=4, symmetric=True, calibration="mse"), X)
    acts = quant.collect_inputs(model, X)
    for name, layer in q.named_modules():
        if isinstance(layer, quant.FakeQuantLayer):
            expected = quant.calibrate_range(acts[name], method="mse", bits=4, symmetric=False)
            assert tuple(layer.act_range.tolist()) == pytest.approx(expected), name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ptq_and_qat_work_for_every_model_of_the_zoo(name):
    data = load("digits28" if name in ("lenet300", "lenet5") else "digits")
    model = build(name, input_shape=data.input_shape, num_classes=data.num_classes, seed=0)
    from workbench.train import fit

    fit(model, data, epochs=1, progress=False)
    model.eval()
    q = quant.quantize_model(model, quant.QuantConfig(weight_bits=8, act_bits=8), data.X_train[:256])
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert sum(isinstance(m, quant.FakeQuantLayer) for m in q.modules()) == layers  # every one, attention's too
    with torch.no_grad():
        ref, out = model(data.X_test), q(data.X_test)
    assert quant.sqnr(ref, out) > 25  # int8 logits: ~35 dB (vit) to ~50 dB (lenet5) here
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.97
    hist = fit(q, data, epochs=1, lr=1e-4, progress=False)  # QAT: the STE carries gradients through every layer
    assert math.isfinite(hist.train_loss[0])

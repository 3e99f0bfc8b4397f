"""QuantizationExplorer driven like a user: controls change, figures and info follow, cached points come back cached."""

import numpy as np
import pytest

from workbench import Recipe, plots, quant, run
from workbench.widgets.quant import QuantizationExplorer

FAST = Recipe(model="mlp", dataset="digits", epochs=3, latency_repeats=5, model_options={"hidden": [32]},
              export_onnx=False)
LARGEST = ("net.1", 32, 64)  # Linear(64 -> 32): name, output channels, weights per channel


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("widgets-quant-cache")


@pytest.fixture(scope="module")
def explorer(cache):
    return QuantizationExplorer(FAST, cache=cache)


def _grid(ex):
    """The drawn levels and clipping range of the weight figure."""
    levels = np.asarray(ex.weights.data[1].x, dtype=float)
    x = ex.weights.data[2].x
    return levels, (x[0], x[3])


def _channel_qparams(ex, recipe):
    """The qparams the model itself uses for the channel the explorer drew (from the title)."""
    layer = ex.results[recipe].load_model().get_submodule(LARGEST[0])
    qp = layer.weight_qparams()
    ch = int(ex.weights.layout.title.text.split("output channel ")[1].split()[0])
    return layer, qp, ch


def test_starts_at_8_bits_from_a_float_base(explorer):
    recipe = explorer.recipe()
    fp32 = explorer.results[FAST]
    assert recipe == FAST.replace(weight_bits=8) and recipe.act_bits == 0
    res = explorer.results[recipe]
    assert res.recipe.quantized and res.dense_accuracy == fp32.accuracy
    assert list(explorer.curve.data[0].x) == [8] and list(explorer.curve.data[2].y) == [res.accuracy]
    assert list(explorer.curve.data[1].y) == [fp32.accuracy] * 2
    assert explorer.bits.continuous_update is False and explorer.qat.continuous_update is False
    assert (explorer.bits.min, explorer.bits.max, explorer.qat.min, explorer.qat.max) == (1, 8, 0, 3)
    assert explorer.calibration.disabled and tuple(explorer.calibration.options) == quant.CALIBRATIONS
    assert f"{res.accuracy:.2%}" in explorer.info.value and "pp" in explorer.info.value


def test_fewer_bits_add_a_point_and_redraw(explorer):
    traces = explorer.curve.data
    explorer.bits.value = 4
    recipe = explorer.recipe()
    res = explorer.results[recipe]
    assert recipe == FAST.replace(weight_bits=4)
    assert all(a is b for a, b in zip(explorer.curve.data, traces))
    assert list(explorer.curve.data[0].x) == [4, 8] and list(explorer.curve.data[2].x) == [4]
    assert list(explorer.curve.data[0].y)[0] == res.accuracy
    # SQNR bars are the Result's, and 4 bits lose about 4 x 6 dB against 8 bits.
    assert list(explorer.layers.data[0].x) == list(res.layer_sqnr)
    assert list(explorer.layers.data[0].y) == list(res.layer_sqnr.values())
    sqnr8 = explorer.results[FAST.replace(weight_bits=8)].layer_sqnr
    assert all(15 < sqnr8[n] - v < 33 for n, v in res.layer_sqnr.items())
    # The grid: 16 levels S(q - Z) of one channel's qparams, spanning the clipping range.
    levels, (lo, hi) = _grid(explorer)
    assert len(levels) == 2 ** 4 and (lo, hi) == (levels[0], levels[-1])
    assert np.all(np.diff(levels) > 0)
    layer, qp, ch = _channel_qparams(explorer, recipe)
    scale = float(qp.scale[ch])
    assert levels == pytest.approx(scale * np.arange(-8, 8), rel=1e-6)  # symmetric: Z = 0, codes -8..7
    w = layer.layer.weight.detach()[ch]
    assert sum(explorer.weights.data[0].y) == LARGEST[2]
    assert lo <= float(w.min()) and float(w.max()) <= hi + 1e-7 and -lo == pytest.approx(float(w.abs().max()) * 8 / 7)
    # The fake-quantized weights of that channel land on the drawn levels.
    on_grid = layer.quantized_weight().detach()[ch].numpy()
    assert np.abs(on_grid[:, None] - levels[None, :]).min(1).max() < 1e-6
    assert "packed size" in explorer.info.value and "x smaller" in explorer.info.value


def test_asymmetric_grid_has_a_zero_point(explorer):
    explorer.symmetric.value = False
    recipe = explorer.recipe()
    assert recipe.quant_symmetric is False and recipe.weight_bits == 4
    assert list(explorer.curve.data[0].x) == [4]  # a new family: only this point so far
    levels, (lo, hi) = _grid(explorer)
    layer, qp, ch = _channel_qparams(explorer, recipe)
    assert len(levels) == 16 and 0.0 in levels  # zero is exactly representable
    w = layer.layer.weight.detach()[ch]
    step = float(qp.scale[ch])
    assert lo == pytest.approx(min(float(w.min()), 0), abs=step) and hi == pytest.approx(float(w.max()), abs=step)
    explorer.symmetric.value = True


def test_per_tensor_and_per_group(explorer):
    explorer.granularity.value = "per-tensor"
    res = explorer.results[explorer.recipe()]
    per_channel = explorer.results[FAST.replace(weight_bits=4)]
    levels, (lo, hi) = _grid(explorer)
    w = res.load_model().get_submodule(LARGEST[0]).layer.weight.detach()
    assert sum(explorer.weights.data[0].y) == w.numel() and "whole layer" in explorer.weights.layout.title.text
    assert len(levels) == 16 and -lo == pytest.approx(float(w.abs().max()) * 8 / 7)
    # one scale for the whole layer fits each channel worse than its own scale
    assert res.layer_sqnr[LARGEST[0]] < per_channel.layer_sqnr[LARGEST[0]]
    assert list(explorer.layers.data[0].y) == list(res.layer_sqnr.values())

    explorer.granularity.value = "per-group"
    res = explorer.results[explorer.recipe()]
    assert res.recipe.quant_granularity == "per-group"
    assert sum(explorer.weights.data[0].y) == quant.QuantConfig.group_size
    assert "group 0 of output channel" in explorer.weights.layout.title.text
    assert len(_grid(explorer)[0]) == 16
    explorer.granularity.value = "per-channel"


def test_activations_and_calibration(explorer):
    explorer.act_bits.value = 8
    assert not explorer.calibration.disabled
    recipe = explorer.recipe()
    assert (recipe.act_bits, recipe.calibration) == (8, "minmax")
    explorer.calibration.value = "mse"
    recipe = explorer.recipe()
    assert recipe.calibration == "mse"
    model = explorer.results[recipe].load_model()
    minmax = explorer.results[recipe.replace(calibration="minmax")].load_model()
    # MSE clipping narrows the activation range of some layer compared with min-max
    ranges = [(m.act_range, n.act_range) for m, n in zip(model.modules(), minmax.modules())
              if isinstance(m, quant.FakeQuantLayer)]
    assert all(float(a[1] - a[0]) <= float(b[1] - b[0]) + 1e-6 for a, b in ranges)
    assert any(float(a[1] - a[0]) < float(b[1] - b[0]) for a, b in ranges)
    assert "8-bit activations (mse calibration)" in explorer.info.value
    explorer.act_bits.value = 0  # float activations: calibration is pinned, its menu disabled
    assert explorer.calibration.disabled and explorer.recipe().calibration == "minmax"
    assert explorer.recipe() == FAST.replace(weight_bits=4)
    explorer.calibration.value = "minmax"


def test_qat_is_its_own_family(explorer):
    explorer.qat.value = 1
    recipe = explorer.recipe()
    res = explorer.results[recipe]
    assert recipe.qat_epochs == 1 and res.steps["quantize"].qat["val_acc"]
    assert list(explorer.curve.data[0].x) == [4] and "QAT 1" in explorer.curve.data[0].name
    assert "QAT 1 epoch" in explorer.info.value
    explorer.qat.value = 0
    assert list(explorer.curve.data[0].x) == [4, 8]


def test_one_bit_symmetric_shows_the_error_and_recovers(explorer):
    explorer.bits.value = 1
    assert "color:#c62828" in explorer.info.value and "1-bit symmetric" in explorer.info.value
    assert explorer.update() is None
    assert explorer.curve.data[2].x == () and list(explorer.curve.data[0].x) == [4, 8]
    explorer.symmetric.value = False  # asymmetric 1 bit: two levels, one of them zero
    res = explorer.results[explorer.recipe()]
    assert "color:#c62828" not in explorer.info.value and res.recipe.weight_bits == 1
    levels, _ = _grid(explorer)
    assert len(levels) == 2 and 0.0 in levels
    explorer.symmetric.value = True
    assert explorer.update() is None
    explorer.bits.value = 4
    assert "color:#c62828" not in explorer.info.value


def test_back_to_a_computed_point_is_cached(explorer):
    explorer.bits.value = 8
    res = explorer.update()
    assert res.cached and res == explorer.results[explorer.recipe()]
    assert explorer.last_seconds > 0 and "from the cache" in explorer.info.value


def test_precompute_fills_the_cache(explorer, cache):
    results = explorer.precompute(bits=(2, 4, 8))
    assert [r.recipe.weight_bits for r in results] == [2, 4, 8]
    assert [r.cached for r in results] == [False, True, True]
    assert list(explorer.curve.data[0].x) == [2, 4, 8]
    explorer.bits.value = 2
    assert explorer.results[explorer.recipe()].cached
    assert run(FAST.replace(weight_bits=2), cache=cache, progress=False).cached


def test_precompute_takes_lists_and_skips_impossible_settings(explorer):
    results = explorer.precompute(bits=(1, 4), symmetric=[True, False])
    assert [(r.recipe.weight_bits, r.recipe.quant_symmetric) for r in results] == [(4, True), (1, False), (4, False)]
    assert all(r.cached for r in results)  # all computed by the tests above
    with pytest.raises(ValueError, match="unknown precompute setting"):
        explorer.precompute(bits=(4,), weight_bits=4)


def test_refuses_a_non_recipe():
    with pytest.raises(ValueError, match="needs a workbench Recipe"):
        QuantizationExplorer({"model": "mlp"})


def test_displays_as_the_widget(explorer):
    bundle = explorer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id


def test_static_twin_steps_through_every_precomputed_point(explorer):
    from workbench.widgets.quant import BITS
    assert BITS == tuple(range(explorer.bits.min, explorer.bits.max + 1))
    explorer.set_controls(bits=8, symmetric=True, granularity="per-channel", act_bits=0, qat=0)
    explorer.precompute(bits=(2, 4, 8), granularity=["per-tensor", "per-channel"])
    fig = explorer.static_figure()
    steps = fig.layout.sliders[0].steps
    grid = explorer.static_grid()
    # Every point computed so far: the 2/4/8-bit per-tensor and per-channel ones and what the
    # tests above visited (per-group, asymmetric, 1-bit asymmetric, 8-bit activations, QAT).
    assert len(steps) == len(grid) == len({tuple(explorer.needs(s)) for s in grid})
    expected = {r for r in explorer.results if r.weight_bits}
    assert {explorer.needs(s)[0] for s in grid} == expected
    labels = [s.label for s in steps]
    k2, k8 = labels.index("2 bits per-tensor"), labels.index("8 bits per-channel")
    a, b = plots.step_traces(fig, k2), plots.step_traces(fig, k8)
    assert a[2]["x"] != b[2]["x"] and len(a[5]["x"]) == 4 and len(b[5]["x"]) == 256  # current point, levels
    for k, bits, gran in ((k2, 2, "per-tensor"), (k8, 8, "per-channel")):
        res = explorer.results[FAST.replace(weight_bits=bits, quant_granularity=gran)]
        title = steps[k].args[1]["title.text"]
        assert f"{bits}-bit symmetric {gran} weights" in title and f"{res.accuracy:.2%}" in title
    # One definition: the widget set to a grid value draws exactly that step's traces.
    for k in (k2, k8):
        explorer.set_controls(**grid[k])
        assert explorer.drawn(list(a[0])) == plots.step_traces(fig, k)
    explorer.set_controls(bits=4)
    explorer.bits.value = 2  # the slider itself
    explorer.granularity.value = "per-tensor"
    assert explorer.drawn(list(a[0])) == a

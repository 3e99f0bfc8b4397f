"""DecodingExplorer: a grid measured once on a tiny random GPT (torch, ORT fp32, ORT int4), and its static twin."""

import json

import pytest

from workbench import WorkbenchError, plots
from workbench.llm import GPT, GPTConfig
from workbench.llm import onnx_gpt as og
from workbench.widgets import DecodingExplorer
from workbench.widgets.decoding import PRECISION_NAMES, key, measure_grid

# One block of width 32 (MLP 128 wide, both multiples of int4's block of 32): exports in seconds.
CONFIG = GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=32)
LENGTHS = (8, 16, 32)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoding")
    model = GPT(CONFIG, seed=0).eval()  # random weights: they time as trained ones do
    og.export_gpt(model, d / "g.onnx")
    og.quantize_int4(d / "g.onnx", d / "g.int4.onnx")
    return measure_grid(model, fp32=og.OrtGPT(d / "g.onnx"), int4=og.OrtGPT(d / "g.int4.onnx"), lengths=LENGTHS,
                        repeats=3)


def test_measure_grid_is_complete_and_json(measured):
    assert measured["lengths"] == list(LENGTHS) and measured["precisions"] == ["torch_fp32", "ort_fp32", "ort_int4"]
    assert set(measured["tokens_per_s"]) == {key(p, c, n) for p in measured["precisions"] for c in (True, False)
                                             for n in LENGTHS}
    assert all(v > 0 for v in measured["tokens_per_s"].values())
    assert GPTConfig(**measured["config"]) == CONFIG
    back = json.loads(json.dumps(measured))  # what a notebook may save and load again draws the same
    assert DecodingExplorer(back).drawn() == DecodingExplorer(measured).drawn()


def test_measure_grid_refuses_bad_settings():
    model = GPT(CONFIG)
    with pytest.raises(WorkbenchError, match="from 2 to the model's block_size 32"):
        measure_grid(model, lengths=(8, 64))
    with pytest.raises(WorkbenchError, match="same model"):
        measure_grid(model, fp32=GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32)),
                     lengths=(8,))
    torch_only = measure_grid(model, lengths=(4,), repeats=1)
    assert torch_only["precisions"] == ["torch_fp32"] and len(torch_only["tokens_per_s"]) == 2


def test_measurements_are_checked_in_words(measured):
    with pytest.raises(WorkbenchError, match="the dict measure_grid returns"):
        DecodingExplorer({"lengths": [8]})
    partial = dict(measured, tokens_per_s={k: v for k, v in measured["tokens_per_s"].items() if "|32" not in k})
    with pytest.raises(WorkbenchError, match="lack 6 grid point"):
        DecodingExplorer(partial)
    with pytest.raises(WorkbenchError, match="precisions must be among"):
        DecodingExplorer(dict(measured, precisions=["ort_int8"]))


def test_controls_move_the_current_point(measured):
    ex = DecodingExplorer(measured)
    assert ex.controls() == {"length": 32, "cache": True, "precision": "ort_int4"}
    tps = measured["tokens_per_s"]
    assert ex.speed.data[-1].x == (32,) and ex.speed.data[-1].y == (tps[key("ort_int4", True, 32)],)
    assert ex.set_controls(length=8, cache=False, precision="torch_fp32") == tps[key("torch_fp32", False, 8)]
    assert ex.speed.data[-1].x == (8,)
    line = ex.speed.data[1]  # torch fp32 without the cache: its markers are the large ones now
    assert line.name == "torch fp32, no cache" and line.y == tuple(tps[key("torch_fp32", False, n)] for n in LENGTHS)
    assert set(line.marker.size) == {11} and set(ex.speed.data[0].marker.size) == {6}
    ex.precision.value = "ort_fp32"  # the control itself
    assert ex.speed.data[-1].y == (tps[key("ort_fp32", False, 8)],)
    assert ex.headline.startswith("ORT fp32, no cache, context 8:") and "x torch fp32 without the cache" in ex.headline
    assert f"{tps[key('ort_int4', True, 8)]:,.0f}" in ex.info.value


def test_static_figure_steps_are_the_grid_and_what_the_widget_draws(measured):
    ex = DecodingExplorer(measured)
    fig = ex.static_figure()
    assert ex.controls() == {"length": 32, "cache": True, "precision": "ort_int4"}  # put back afterwards
    steps = fig.layout.sliders[0].steps
    grid = ex.static_grid()
    assert len(steps) == len(grid) == len(ex.grid()) == len(LENGTHS) * 2 * 3
    assert len(fig.data) == 3 * 2 + 1  # a line per precision and cache setting, the current point
    assert steps[0].label == f"8, KV cache, {PRECISION_NAMES['torch_fp32']}"
    a = plots.step_traces(fig, 0)
    for k, setting in enumerate(grid):  # one definition: the widget draws exactly the step
        ex.set_controls(**setting)
        assert ex.drawn(list(a[0])) == plots.step_traces(fig, k)
        assert steps[k].args[1]["title.text"] == ex.headline
    assert plots.step_traces(fig, 0) != plots.step_traces(fig, 5)  # the current point moves

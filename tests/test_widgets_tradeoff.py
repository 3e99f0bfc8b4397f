"""TradeoffExplorer: pruning ratio x bit-width from a cached sweep, Pareto fronts, the static site figure."""

import pytest

from workbench import Recipe, WorkbenchError, plots, run
from workbench.widgets import TradeoffExplorer
from workbench.widgets.tradeoff import pareto, recipe_for, static_figure

FAST = dict(model="cnn", dataset="digits", epochs=2, latency_repeats=5, model_options={"channels": [8, 16]})


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    return TradeoffExplorer(Recipe(**FAST), cache=tmp_path_factory.mktemp("tradeoff-cache"), amounts=(0.0, 0.5),
                            finetune_epochs=1)


def test_grid_recipes():
    base = Recipe(**FAST)
    assert recipe_for(base, 0.0, 32) == base
    assert recipe_for(base, 0.5, 8).ort_quant == "auto" and recipe_for(base, 0.5, 8).prune_kind == "structured"
    assert recipe_for(base, 0.0, 4).weight_bits == 4
    with pytest.raises(WorkbenchError, match="bits must be one of 32, 8, 4"):
        recipe_for(base, 0.0, 16)


def test_controls_move_the_current_point(explorer):
    assert explorer.latency_plot.data[2].y == (explorer.results[Recipe(**FAST)].accuracy,)
    explorer.bits.value = 8
    int8 = explorer.results[explorer.recipe()]
    assert int8.steps["ort_quant"].mode == "static"
    assert explorer.size_plot.data[2].x[0] == pytest.approx(int8.size_onnx_bytes / 1024)
    explorer.ratio.value = 0.5
    assert explorer.results[explorer.recipe()].params < int8.params
    assert len(explorer.latency_plot.data[0].x) == 3
    explorer.bits.value = 4
    assert "no int4 kernels" in explorer.info.value
    p = [q for q in explorer.points() if q["bits"] == 4][0]
    assert p["size_kb"] == pytest.approx(explorer.results[explorer.recipe()].size_quantized_bytes / 1024)


def test_pareto_front():
    pts = [dict(latency_us=1, accuracy=0.9), dict(latency_us=2, accuracy=0.95), dict(latency_us=3, accuracy=0.94),
           dict(latency_us=0.5, accuracy=0.5)]
    assert [p["latency_us"] for p in pareto(pts)] == [0.5, 1, 2]


def test_precompute_and_static_figure(explorer):
    results = explorer.precompute(bits=(32, 8))
    assert len(results) == 4 and all(r.cached or r.accuracy > 0 for r in results)
    assert explorer.update() is explorer.results[explorer.recipe()]
    assert run(explorer.recipe(), cache=explorer.cache).cached  # the grid is in the on-disk cache
    fig = static_figure(explorer)
    steps = fig.layout.sliders[0].steps
    grid = explorer.static_grid()
    # 0 and 50 % x fp32 and int8, and 50 % int4 (computed by the test above): every computed grid point
    assert len(steps) == len(grid) == 5 and [s.label for s in steps] == ["0% fp32", "0% int8",
                                                                         "50% fp32", "50% int8", "50% int4"]
    assert len(fig.data) == 6  # accuracy vs latency and vs size, three traces each
    a, b = plots.step_traces(fig, 0), plots.step_traces(fig, 3)
    assert a[2]["x"] != b[2]["x"] and a[5]["y"] != b[5]["y"]  # the current point moves
    for k, (amount, bits) in ((0, (0.0, 32)), (3, (0.5, 8))):
        res = explorer.results[recipe_for(Recipe(**FAST), amount, bits, finetune_epochs=1)]
        title = steps[k].args[1]["title.text"]
        assert f"{amount:.0%} pruned" in title and f"{res.accuracy:.2%}" in title
    assert "text" not in fig.data[0].mode  # no text labels on the scatter: they overlapped; hover shows them
    for k, setting in enumerate(grid):  # one definition: the widget draws exactly the step
        explorer.set_controls(**setting)
        assert explorer.drawn(list(a[0])) == plots.step_traces(fig, k)
    explorer.bits.value = 32  # the controls themselves
    explorer.ratio.value = 0.0
    assert explorer.drawn(list(a[0])) == a


def test_distilled_student_joins_the_grid(tmp_path):
    student = Recipe(model="mlp", dataset="digits", epochs=3, latency_repeats=5, model_options={"hidden": [32]})
    ex = TradeoffExplorer(Recipe(**FAST), cache=tmp_path, amounts=(0.0, 0.5), finetune_epochs=1, student=student)
    assert ex.model.options == ("as given", "distilled student")
    ex.model.value = "distilled student"
    r = ex.recipe()
    assert r.model == "mlp" and r.teacher == Recipe(**FAST) and r.kd_temperature == student.kd_temperature
    assert ex.results[r].teacher_accuracy == ex.results[Recipe(**FAST)].accuracy  # taught by the base model
    ex.bits.value = 8
    assert ex.results[ex.recipe()].steps["ort_quant"].mode == "dynamic"  # auto: no convolutions
    assert ex.size_plot.data[0].marker.symbol == ("circle", "diamond", "diamond")  # the student's points
    kinds = {(p["student"], p["bits"]) for p in ex.points()}
    assert kinds == {(False, 32), (True, 32), (True, 8)}
    assert "distilled mlp, 0% pruned, int8" in ex.info.value
    with pytest.raises(WorkbenchError, match="teacher is trained on"):
        TradeoffExplorer(Recipe(**FAST), cache=tmp_path, student=student.replace(dataset="digits28"))

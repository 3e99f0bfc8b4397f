"""PruningExplorer driven like a user: controls change, figures and info follow, cached points come back cached."""

import re

import pytest

from workbench import Recipe, plots, run
from workbench.widgets import PruningExplorer

FAST = dict(model="mlp", dataset="digits", epochs=2, latency_repeats=5, model_options={"hidden": [32]})
TOTAL_WEIGHTS = 64 * 32 + 32 * 10


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("widgets-cache")


@pytest.fixture(scope="module")
def explorer(cache):
    return PruningExplorer(Recipe(**FAST), cache=cache, max_finetune_epochs=2)


def _params(info: str) -> int:
    return int(re.search(r"params / non-zeros</b></td><td>([\d,]+)", info).group(1).replace(",", ""))


def test_starts_on_the_dense_model(explorer):
    dense = explorer.results[Recipe(**FAST)]
    assert explorer.recipe() == Recipe(**FAST) and explorer.ratio.value == 0
    assert list(explorer.curve.data[2].y) == [dense.accuracy]
    assert list(explorer.curve.data[1].y) == [dense.accuracy] * 2
    assert f"{dense.accuracy:.2%}" in explorer.info.value
    assert not explorer.scope.disabled
    assert explorer.ratio.continuous_update is False and explorer.finetune.continuous_update is False
    assert (explorer.ratio.min, explorer.ratio.max, explorer.ratio.step) == (0.0, 0.95, 0.05)


def test_unstructured_ratio_adds_a_point_and_redraws(explorer):
    traces = explorer.curve.data
    n_before = len(explorer.curve.data[0].x)
    explorer.ratio.value = 0.5
    res = explorer.results[explorer.recipe()]
    assert explorer.recipe() == Recipe(**FAST).replace(prune_amount=0.5)
    assert explorer.curve.data is traces or all(a is b for a, b in zip(explorer.curve.data, traces))
    assert len(explorer.curve.data) == 3 and len(explorer.curve.data[0].x) == n_before + 1
    assert explorer.curve.data[2].x[0] == pytest.approx(0.5, abs=0.02)
    assert any(x == pytest.approx(0.5, abs=0.02) for x in explorer.curve.data[0].x)
    assert list(explorer.layers.data[0].y) == list(res.layer_sparsity.values())
    assert list(explorer.layers.data[0].x) == list(res.layer_sparsity)
    drawn = int(sum(explorer.weights.data[0].y))
    assert drawn == TOTAL_WEIGHTS - round(0.5 * TOTAL_WEIGHTS) < TOTAL_WEIGHTS
    assert f"{TOTAL_WEIGHTS - drawn:,} exact zeros not drawn" in explorer.weights.layout.title.text
    assert f"{res.accuracy:.2%}" in explorer.info.value and "pp" in explorer.info.value
    assert "ORT batch-1 p50" in explorer.info.value


def test_structured_disables_scope_and_shrinks_the_model(explorer):
    dense = explorer.results[Recipe(**FAST)]
    explorer.kind.value = "structured"
    assert explorer.scope.disabled
    recipe = explorer.recipe()
    assert (recipe.prune_kind, recipe.prune_amount) == ("structured", 0.5)
    res = explorer.results[recipe]
    assert res.params < dense.params and _params(explorer.info.value) == res.params
    # The curve now shows the structured family: the dense point and this one.
    assert len(explorer.curve.data[0].x) == 2
    assert explorer.curve.data[2].x[0] == pytest.approx(1 - res.nonzero_params / dense.params)
    # Half of the 32 hidden neurons go: both layers lose half their weights.
    assert list(explorer.layers.data[0].y) == pytest.approx([0.5, 0.5])
    explorer.scope.value = "layer"  # ignored by structured pruning: the same point, from the cache
    assert explorer.recipe() == recipe and explorer.update().cached
    explorer.scope.value = "global"
    explorer.kind.value = "unstructured"
    assert not explorer.scope.disabled


def test_finetune_changes_the_recipe(explorer):
    explorer.finetune.value = 1
    recipe = explorer.recipe()
    assert recipe.finetune_epochs == 1 and recipe.prune_amount == 0.5
    res = explorer.results[recipe]
    assert res.key != explorer.results[recipe.replace(finetune_epochs=0)].key
    assert res.steps["prune"].rounds
    explorer.finetune.value = 0


def test_back_to_a_computed_point_is_cached(explorer):
    explorer.ratio.value = 0.5
    res = explorer.update()
    assert res.cached and res == explorer.results[explorer.recipe()]
    assert explorer.last_seconds > 0
    assert "from the cache" in explorer.info.value


def test_ratio_zero_is_the_dense_recipe(explorer):
    explorer.finetune.value = 1
    explorer.ratio.value = 0.0
    assert explorer.recipe() == Recipe(**FAST)
    explorer.finetune.value = 0


def test_impossible_structured_ratio_shows_the_error(cache):
    tiny = PruningExplorer(Recipe(**FAST | {"epochs": 1, "export_onnx": False, "model_options": {"hidden": [2]}}),
                           cache=cache)
    tiny.kind.value = "structured"
    tiny.ratio.value = 0.95  # round(0.95 * 2) = 2 of 2 neurons: nothing left
    assert "would remove all of them" in tiny.info.value and "color:#c62828" in tiny.info.value
    assert tiny.update() is None
    assert tiny.curve.data[2].x == () and len(tiny.curve.data[0].x) == 1  # only the dense point
    tiny.ratio.value = 0.5
    assert "would remove" not in tiny.info.value and tiny.results[tiny.recipe()].params < tiny.results[
        tiny.base].params
    assert "n/a (no ONNX export)" in tiny.info.value


def test_precompute_fills_the_cache(explorer, cache):
    results = explorer.precompute((0.0, 0.3, 0.6))
    assert [r.recipe.prune_amount for r in results] == [0.0, 0.3, 0.6]
    assert all(r.recipe.prune_kind == "unstructured" for r in results[1:])
    assert len(explorer.curve.data[0].x) >= 4  # dense, 0.3, 0.5, 0.6
    explorer.ratio.value = 0.6
    assert explorer.results[explorer.recipe()].cached
    assert run(Recipe(**FAST).replace(prune_amount=0.3), cache=cache, progress=False).cached


def test_precompute_takes_lists_of_settings(explorer):
    results = explorer.precompute((0.5,), kind=["unstructured", "structured"])
    assert [r.recipe.prune_kind for r in results] == ["unstructured", "structured"]
    assert all(r.cached for r in results)  # both were computed by the tests above


def test_precompute_refuses_unknown_settings(explorer):
    with pytest.raises(ValueError, match="unknown precompute setting"):
        explorer.precompute((0.5,), prune_kind="structured")


def test_displays_as_the_widget(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id


def test_the_grid_is_what_the_controls_offer(explorer):
    from workbench.widgets.pruning import AMOUNTS, KINDS
    assert AMOUNTS == tuple(round(explorer.ratio.min + i * explorer.ratio.step, 2) for i in range(len(AMOUNTS)))
    assert AMOUNTS[-1] == explorer.ratio.max and tuple(explorer.kind.options) == KINDS
    # unstructured: 2 scopes x 3 fine-tunes x 20 ratios; structured (no scope): 3 x 20
    assert len(explorer.grid()) == 2 * 3 * 20 + 3 * 20
    assert len(explorer.distinct_grid()) == 9 * 19 + 1  # ratio 0 is the one dense model of every family


def test_static_twin_steps_through_every_precomputed_point(tmp_path):
    ex = PruningExplorer(Recipe(**FAST | {"export_onnx": False}), cache=tmp_path, max_finetune_epochs=1)
    ex.precompute((0.0, 0.3, 0.6))
    ex.precompute((0.5,), kind="structured")
    before = ex.controls()
    fig = ex.static_figure()
    assert ex.controls() == before
    steps = fig.layout.sliders[0].steps
    grid = ex.static_grid()
    # unstructured 0 / 30 / 60 % and structured 50 % (structured 0 % is the same dense point: one step)
    assert [(s["kind"], s["ratio"]) for s in grid] == [("unstructured", 0.0), ("unstructured", 0.3),
                                                        ("unstructured", 0.6), ("structured", 0.5)]
    assert len(steps) == len(grid) == 4 and [s.label for s in steps] == ["0%", "30%", "60%", "50% structured"]
    first, second = plots.step_traces(fig, 1), plots.step_traces(fig, 2)
    assert first[2]["x"] != second[2]["x"] and first[3]["y"] != second[3]["y"]  # current point, per-layer bars
    for k, ratio in ((1, 0.3), (2, 0.6)):
        res = ex.results[ex._recipe_for(ratio, "unstructured", "global", 0)]
        title = steps[k].args[1]["title.text"]
        assert f"{ratio:.0%} pruned, unstructured global" in title and f"{res.accuracy:.2%}" in title
    assert steps[1].args[1]["title.text"] != steps[2].args[1]["title.text"]
    # One definition: the widget set to a grid value draws exactly that step's traces.
    for k, setting in enumerate(grid):
        ex.set_controls(**setting)
        assert ex.drawn(list(plots.step_traces(fig, k)[0])) == plots.step_traces(fig, k)
    ex.set_controls(**grid[0])
    ex.ratio.value = 0.3  # by the slider itself, as a user would
    assert ex.drawn(list(first[0])) == first
    assert len(fig.data) == len(ex.drawn())

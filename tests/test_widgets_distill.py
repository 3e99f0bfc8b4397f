"""DistillationExplorer driven like a user: controls change, figures and info follow, cached points come back cached."""

import pytest
import torch

from workbench import Recipe, WorkbenchError, load, plots, run
from workbench.distill import soft_targets
from workbench.train import predict
from workbench.widgets import distill as widget_mod
from workbench.widgets.distill import DistillationExplorer

FAST = dict(model="mlp", dataset="digits", epochs=2, latency_repeats=5, export_onnx=False)
STUDENT = Recipe(**FAST, model_options={"hidden": [8]}, kd_temperature=4.0, kd_alpha=0.9)
TEACHER = Recipe(**FAST | {"epochs": 3}, model_options={"hidden": [64]})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("widgets-distill-cache")


@pytest.fixture(scope="module")
def explorer(cache):
    return DistillationExplorer(STUDENT, TEACHER, cache=cache, temperatures=(1, 2, 4, 8))


def test_starts_on_the_students_settings(explorer, cache):
    assert explorer.recipe() == STUDENT.replace(teacher=TEACHER)
    assert (explorer.temperature.value, explorer.alpha.value) == (4.0, 0.9)
    assert explorer.temperature.continuous_update is False and explorer.alpha.continuous_update is False
    assert (explorer.alpha.min, explorer.alpha.max, explorer.alpha.step) == (0.0, 1.0, 0.1)
    res = explorer.results[explorer.recipe()]
    teacher = run(TEACHER, cache=cache, progress=False)  # the explorer trained it on the same split
    assert teacher.cached and explorer.teacher_result.key == teacher.key
    assert res.teacher_accuracy == teacher.accuracy
    assert explorer.alone.recipe == STUDENT.replace(teacher=None) and explorer.alone.teacher_accuracy is None
    assert list(explorer.curve.data[0].x) == [4.0] and list(explorer.curve.data[0].y) == [res.accuracy]
    assert list(explorer.curve.data[1].y) == [teacher.accuracy] * 2
    assert list(explorer.curve.data[2].y) == [explorer.alone.accuracy] * 2
    assert list(explorer.curve.data[3].y) == [res.accuracy]
    assert f"{res.accuracy:.2%} distilled" in explorer.info.value and "pp" in explorer.info.value


def test_the_soft_targets_are_the_teachers_softmax_at_t(explorer, cache):
    ds = load("digits", seed=STUDENT.seed)
    z = predict(run(TEACHER, cache=cache, progress=False).load_model(), ds.X_test)[explorer.example]
    assert list(explorer.soft.data[0].y) == pytest.approx(torch.softmax(z, 0).tolist())
    assert list(explorer.soft.data[1].y) == pytest.approx(soft_targets(z, temperature=4.0).tolist())
    assert f"label {ds.classes[int(ds.y_test[explorer.example])]}" in explorer.image.layout.title.text
    # The default example is the test image where the teacher's runner-up class is most likely.
    second = torch.softmax(predict(run(TEACHER, cache=cache, progress=False).load_model(), ds.X_test), 1)
    assert explorer.example == int(second.topk(2, dim=1).values[:, 1].argmax())


def test_temperature_adds_a_point_and_flattens_the_targets(explorer):
    before_bars = list(explorer.soft.data[1].y)
    before_x = list(explorer.curve.data[0].x)
    explorer.temperature.value = 8.0
    recipe = explorer.recipe()
    assert recipe.kd_temperature == 8.0 and recipe.kd_alpha == 0.9
    res = explorer.results[recipe]
    assert not res.cached
    assert list(explorer.curve.data[0].x) == sorted(before_x + [8.0])
    assert list(explorer.curve.data[3].x) == [8.0] and list(explorer.curve.data[3].y) == [res.accuracy]
    after = list(explorer.soft.data[1].y)
    assert after != before_bars and max(after) < max(before_bars)  # hotter: flatter
    assert explorer.soft.data[1].name == "T = 8" and "T = 8" in explorer.soft.layout.title.text
    assert "T = 8, alpha = 0.9" in explorer.info.value


def test_alpha_switches_the_curve_family(explorer):
    explorer.alpha.value = 0.5
    recipe = explorer.recipe()
    assert (recipe.kd_temperature, recipe.kd_alpha) == (8.0, 0.5)
    assert list(explorer.curve.data[0].x) == [8.0]  # only this point has alpha 0.5 so far
    assert explorer.curve.data[0].name == "distilled, alpha 0.5"
    explorer.alpha.value = 0.9
    assert list(explorer.curve.data[0].x) == [4.0, 8.0]


def test_back_to_a_computed_point_is_cached(explorer):
    explorer.temperature.value = 4.0
    res = explorer.update()
    assert res.cached and res == explorer.results[explorer.recipe()]
    assert explorer.last_seconds > 0 and "from the cache" in explorer.info.value


def test_precompute_fills_every_temperature(explorer, cache):
    results = explorer.precompute(alphas=0.9)
    assert [r.recipe.kd_temperature for r in results] == [1.0, 2.0, 4.0, 8.0]
    assert list(explorer.curve.data[0].x) == [1.0, 2.0, 4.0, 8.0]
    explorer.temperature.value = 2.0
    assert explorer.results[explorer.recipe()].cached
    assert run(STUDENT.replace(teacher=TEACHER, kd_temperature=1.0), cache=cache, progress=False).cached


def test_a_refused_run_shows_the_error(explorer, monkeypatch):
    def refuse(recipe, **kwargs):
        raise WorkbenchError("no room for this student")

    monkeypatch.setattr(widget_mod, "run", refuse)
    explorer.temperature.value = 1.0
    assert explorer.update() is None
    assert "no room for this student" in explorer.info.value and "color:#c62828" in explorer.info.value
    assert explorer.curve.data[3].x == ()
    assert list(explorer.soft.data[1].y) == pytest.approx(explorer.soft.data[0].y)  # T = 1 still drawn
    monkeypatch.undo()
    explorer.temperature.value = 2.0
    assert "no room" not in explorer.info.value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(student="mlp", teacher=TEACHER), "needs a workbench Recipe as student"),
        (dict(student=STUDENT, teacher=TEACHER.replace(dataset="digits28")), "needs the same data"),
        (dict(student=STUDENT, teacher=TEACHER, temperatures=(0, 4)), "temperatures must be numbers > 0"),
        (dict(student=STUDENT, teacher=TEACHER, temperatures=("hot",)), "temperatures must be numbers > 0"),
        (dict(student=STUDENT, teacher=TEACHER, temperatures=()), "temperatures must be numbers > 0"),
        (dict(student=STUDENT, teacher=TEACHER, example=10_000), "index into the 360 test images"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message, cache):
    with pytest.raises(WorkbenchError, match=message):
        DistillationExplorer(**kwargs, cache=cache)


def test_displays_as_the_widget(explorer):
    bundle = explorer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id


def test_static_twin_steps_through_every_precomputed_temperature(explorer):
    from workbench.widgets.distill import ALPHAS
    assert ALPHAS == tuple(round(explorer.alpha.min + i * explorer.alpha.step, 1) for i in range(len(ALPHAS)))
    explorer.set_controls(temperature=4.0, alpha=0.9)
    explorer.precompute(alphas=0.9)
    fig = explorer.static_figure()
    steps = fig.layout.sliders[0].steps
    grid = explorer.static_grid()
    # the four temperatures at alpha 0.9, and T = 8 at alpha 0.5 (visited above)
    assert [(s["alpha"], s["temperature"]) for s in grid] == [(0.5, 8.0), (0.9, 1.0), (0.9, 2.0), (0.9, 4.0),
                                                               (0.9, 8.0)]
    assert len(steps) == 5 and steps[1].label == "1 (alpha 0.9)"
    assert fig.layout.sliders[0].active == 3  # the widget's setting before: T = 4, alpha 0.9
    a, b = plots.step_traces(fig, 1), plots.step_traces(fig, 4)
    assert a[3]["x"] == [1.0] and b[3]["x"] == [8.0] and a[5]["y"] != b[5]["y"]  # current point, soft targets
    for k, t in ((1, 1.0), (4, 8.0)):
        res = explorer.results[STUDENT.replace(teacher=TEACHER, kd_temperature=t)]
        title = steps[k].args[1]["title.text"]
        assert f"T = {t:g}, alpha = 0.9" in title and f"{res.accuracy:.2%}" in title
    for k, setting in enumerate(grid):  # one definition: the widget draws exactly the step
        explorer.set_controls(**setting)
        assert explorer.drawn(list(a[0])) == plots.step_traces(fig, k)
    explorer.temperature.value = 1.0  # the slider itself
    explorer.alpha.value = 0.9
    assert explorer.drawn(list(a[0])) == a

"""LRExplorer driven like a user: each control change trains (or fetches) the schedule and redraws."""

import pytest

from workbench import Recipe, WorkbenchError, plots, schedules
from workbench.widgets import LRExplorer

FAST = dict(model="mlp", dataset="digits", epochs=3, export_onnx=False, latency_repeats=5, optimizer="sgd",
            lr=0.1, model_options={"hidden": [16]})


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    return LRExplorer(Recipe(**FAST), cache=tmp_path_factory.mktemp("lr-cache"))


def test_starts_on_cosine_and_draws_the_schedule(explorer):
    r = explorer.recipe()
    assert (r.lr_schedule, r.lr) == ("cosine", 0.1) and explorer.gamma.disabled and explorer.power.disabled
    spe = explorer.steps_per_epoch
    s = schedules.Schedule("cosine", total_steps=3 * spe)
    assert list(explorer.lr_curve.data[0].y) == pytest.approx(s.curve(0.1), abs=1e-12)
    res = explorer.results[r]
    assert list(explorer.curves.data[0].y) == res.history["train_loss"]
    assert list(explorer.curves.data[2].y) == res.history["val_acc"]
    flat = explorer.results[Recipe(**FAST)]
    assert list(explorer.curves.data[1].y) == flat.history["train_loss"]
    assert f"{res.accuracy:.2%}" in explorer.info.value


def test_step_schedule_uses_gamma(explorer):
    explorer.kind.value = "step"
    assert not explorer.gamma.disabled
    explorer.gamma.value = 0.2
    r = explorer.recipe()
    assert dict(r.lr_schedule_options) == {"gamma": 0.2, "step_epochs": 1}
    spe = explorer.steps_per_epoch
    y = explorer.lr_curve.data[0].y
    assert y[0] == pytest.approx(0.1) and y[spe] == pytest.approx(0.02) and y[2 * spe] == pytest.approx(0.004)
    assert explorer.results[r].history["lr"][0] == pytest.approx(0.02)


def test_exponential_gamma_is_per_epoch(explorer):
    explorer.kind.value = "exponential"
    explorer.gamma.value = 0.5
    assert explorer.lr_curve.data[0].y[explorer.steps_per_epoch] == pytest.approx(0.05)


def test_warmup_and_polynomial(explorer):
    explorer.kind.value = "polynomial"
    explorer.power.value = 2.0
    explorer.warmup.value = 1
    r = explorer.recipe()
    assert dict(r.lr_schedule_options) == {"warmup_epochs": 1, "power": 2.0}
    assert explorer.lr_curve.data[0].y[0] == pytest.approx(0.01)  # warmup starts at 10% of the base LR
    explorer.warmup.value = 0


def test_cached_point_answers_from_cache(explorer):
    explorer.kind.value = "cosine"
    res = explorer.update()
    assert res is explorer.results[explorer.recipe()] and "cosine" in explorer.info.value


def test_precompute_and_bad_base(explorer):
    results = explorer.precompute(kinds=("constant", "cosine"))
    assert [r.recipe.lr_schedule for r in results] == ["constant", "cosine"]
    with pytest.raises(WorkbenchError, match="needs a recipe that trains"):
        LRExplorer(Recipe(**FAST | {"epochs": 0}))
    with pytest.raises(WorkbenchError, match="needs a workbench Recipe"):
        LRExplorer({"model": "mlp"})


def test_static_twin_steps_through_every_precomputed_schedule(tmp_path):
    from workbench.widgets.lr import GAMMAS, LR_CHOICES, POWERS
    ex = LRExplorer(Recipe(**FAST), cache=tmp_path)
    assert tuple(v for _, v in ex.lr.options) == LR_CHOICES and tuple(ex.kind.options) == schedules.KINDS
    assert (ex.gamma.min, ex.gamma.max, ex.power.min, ex.power.max) == (GAMMAS[0], GAMMAS[-1], POWERS[0], POWERS[-1])
    results = ex.precompute(lrs=(0.01, 0.1))
    assert len(results) == 2 * len(schedules.KINDS)
    fig = ex.static_figure()
    steps = fig.layout.sliders[0].steps
    grid = ex.static_grid()
    assert len(steps) == len(grid) == 2 * len(schedules.KINDS)  # every kind at each precomputed base LR
    assert [s.label for s in steps[:2]] == ["constant, LR 0.01", "step, LR 0.01"]
    cosine, step = (next(k for k, s in enumerate(grid) if (s["kind"], s["lr"]) == (kind, 0.1))
                    for kind in ("cosine", "step"))
    a, b = plots.step_traces(fig, cosine), plots.step_traces(fig, step)
    assert a[0]["y"] != b[0]["y"] and a[1]["y"] != b[1]["y"]  # the schedule and its training run
    for k, kind in ((cosine, "cosine"), (step, "step")):
        res = ex.results[ex.recipe_for(kind, 0.1, ex.gamma.value, ex.power.value, 0)]
        title = steps[k].args[1]["title.text"]
        assert title.startswith(f"{kind} from LR 0.1") and f"{res.accuracy:.2%}" in title
    assert "gamma 0.5" in steps[step].args[1]["title.text"]
    for k, setting in enumerate(grid):  # one definition: the widget draws exactly the step
        ex.set_controls(**setting)
        assert ex.drawn(list(a[0])) == plots.step_traces(fig, k)
    ex.kind.value = "cosine"  # the controls themselves
    ex.lr.value = 0.1
    assert ex.drawn(list(a[0])) == a

"""LR schedules: every formula against torch.optim.lr_scheduler at every step, the LambdaLR hook, bad input."""

import math

import pytest
import torch

from workbench import WorkbenchError, schedules
from workbench.schedules import Schedule

BASE_LR = 0.1

CASES = [
    ("constant", {}),
    ("step", dict(gamma=0.5, step_size=7)),
    ("step", dict(gamma=0.1)),
    ("exponential", dict(gamma=0.97)),
    ("cosine", dict()),
    ("cosine", dict(min_lr_ratio=0.05)),
    ("polynomial", dict(power=1.0)),
    ("polynomial", dict(power=2.0)),
    ("polynomial", dict(power=0.5)),
]


def _torch_curve(schedule: Schedule, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = schedules.torch_reference(schedule, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup", [0, 10])
@pytest.mark.parametrize(("kind", "settings"), CASES)
def test_each_schedule_equals_torch_at_every_step(kind, settings, warmup):
    s = Schedule(kind, total_steps=60, warmup_steps=warmup, **settings)
    ours = [s.lr(t, BASE_LR) for t in range(s.total_steps + 1)]
    ref = _torch_curve(s, s.total_steps + 1)
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= 1e-12


@pytest.mark.parametrize(("kind", "settings"), CASES)
def test_lambda_lr_adapter_drives_the_optimizer(kind, settings):
    s = Schedule(kind, total_steps=40, warmup_steps=4, **settings)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = schedules.lambda_lr(s, opt)
    for t in range(s.total_steps):
        assert opt.param_groups[0]["lr"] == pytest.approx(s.lr(t, BASE_LR), abs=1e-15)
        opt.step()
        sched.step()


def test_closed_forms_by_hand():
    assert schedules.lr_at("polynomial", 50, base_lr=0.1, total_steps=100, power=2.0) == pytest.approx(0.025)
    assert schedules.lr_at("cosine", 50, base_lr=0.1, total_steps=100) == pytest.approx(0.05)
    assert schedules.lr_at("cosine", 100, base_lr=0.1, total_steps=100, min_lr_ratio=0.1) == pytest.approx(0.01)
    assert schedules.lr_at("step", 45, base_lr=1.0, total_steps=90, step_size=30) == pytest.approx(0.1)
    assert schedules.lr_at("exponential", 3, base_lr=1.0, total_steps=10, gamma=0.5) == 0.125
    w = Schedule("constant", total_steps=20, warmup_steps=10, warmup_start=0.0 + 0.1)
    assert w.factor(0) == pytest.approx(0.1) and w.factor(5) == pytest.approx(0.55) and w.factor(10) == 1.0
    # Past the end, cosine and polynomial hold their final value (torch's cosine would rise again).
    p = Schedule("polynomial", total_steps=10)
    assert p.factor(10) == 0.0 and p.factor(25) == 0.0
    assert Schedule("cosine", total_steps=10, min_lr_ratio=0.2).factor(30) == pytest.approx(0.2)


def test_from_epochs_converts_to_steps():
    spe = schedules.steps_per_epoch(1437, 64)
    assert spe == math.ceil(1437 / 64) == 23
    s = schedules.from_epochs("step", epochs=9, steps_per_epoch=spe, step_epochs=3, warmup_epochs=1, gamma=0.5)
    assert (s.total_steps, s.warmup_steps, s.step_size) == (9 * 23, 23, 69)
    with pytest.raises(WorkbenchError, match="unknown schedule option"):
        schedules.from_epochs("cosine", epochs=3, steps_per_epoch=2, T_max=5)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(kind="cosine", total_steps=0), "total_steps must be > 0"),
    (dict(kind="cosine", total_steps=-5), "total_steps must be > 0"),
    (dict(kind="exponential", total_steps=10, gamma=-0.5), "negative or zero rate"),
    (dict(kind="step", total_steps=10, gamma=0.0), "negative or zero rate"),
    (dict(kind="step", total_steps=10, gamma=1.5), r"gamma .* must be in \(0, 1\]"),
    (dict(kind="polynomial", total_steps=10, power=-1.0), "power must be > 0"),
    (dict(kind="cosine", total_steps=10, min_lr_ratio=-0.1), "min_lr_ratio"),
    (dict(kind="cosine", total_steps=10, warmup_steps=10), "warmup_steps must be in"),
    (dict(kind="cosine", total_steps=10, warmup_steps=-1), "warmup_steps must be in"),
    (dict(kind="step", total_steps=10, step_size=0), "step_size must be > 0"),
    (dict(kind="linear", total_steps=10), "unknown LR schedule 'linear'; known: constant"),
    (dict(kind="cosine", total_steps=10.5), "total_steps must be an integer"),
])
def test_bad_settings_raise_one_clear_error(kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        Schedule(**kwargs)


def test_negative_base_lr_and_step():
    with pytest.raises(WorkbenchError, match="base_lr must be positive"):
        schedules.lr_at("cosine", 0, base_lr=-0.1, total_steps=10)
    with pytest.raises(WorkbenchError, match="step must be >= 0"):
        Schedule("cosine", total_steps=10).factor(-1)


def test_recipe_trains_with_the_schedule(tmp_path):
    from workbench import Recipe, load, run

    data = load("digits")
    spe = schedules.steps_per_epoch(len(data.X_train), 64)
    base = Recipe(model="mlp", epochs=3, lr=0.01, export_onnx=False, latency_repeats=5,
                  model_options={"hidden": [16]})
    r = base.replace(lr_schedule="cosine", lr_schedule_options={"warmup_epochs": 1, "min_lr_ratio": 0.1})
    res = run(r, data=data, cache=tmp_path, progress=False)
    s = r.lr_schedule_for(spe)
    # History records the LR after each epoch's last step: the schedule at steps spe, 2 spe, 3 spe.
    assert res.history["lr"] == pytest.approx([s.lr(k * spe, 0.01) for k in (1, 2, 3)], abs=1e-12)
    assert res.key != run(base, data=data, cache=tmp_path, progress=False).key
    assert r.to_dict()["lr_schedule_options"] == {"warmup_epochs": 1, "min_lr_ratio": 0.1}
    with pytest.raises(WorkbenchError, match="unknown LR schedule 'cosin'"):
        base.replace(lr_schedule="cosin")
    with pytest.raises(WorkbenchError, match="negative or zero rate"):
        base.replace(lr_schedule="exponential", lr_schedule_options={"gamma": -0.9})

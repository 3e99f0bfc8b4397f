"""Knowledge distillation: kd_loss against the closed form, the T^2 scaling, distill() and Recipe.teacher."""

import math

import pytest
import torch
from torch.nn import functional as F

from workbench import Recipe, WorkbenchError, build, load, run
from workbench.distill import distill, kd_loss, soft_targets
from workbench.train import evaluate, fit

FAST = dict(model="mlp", dataset="digits", epochs=2, latency_repeats=5, export_onnx=False,
            model_options={"hidden": [16]})
TEACHER = dict(FAST, epochs=3, model_options={"hidden": [64]})


def _logits(seed, batch=6, classes=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    zt = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return zs, zt, y


def _by_hand(zs, zt, y, T, alpha):
    """The loss written out element by element from the definitions (no torch.nn.functional)."""
    batch, classes = zs.shape
    kl = ce = 0.0
    for i in range(batch):
        es = [math.exp(v / T) for v in zs[i].tolist()]
        et = [math.exp(v / T) for v in zt[i].tolist()]
        q = [e / sum(es) for e in es]   # student's softened distribution
        p = [e / sum(et) for e in et]   # teacher's softened distribution (the soft targets)
        kl += sum(p[k] * math.log(p[k] / q[k]) for k in range(classes))
        e1 = [math.exp(v) for v in zs[i].tolist()]
        ce += -math.log(e1[int(y[i])] / sum(e1))  # hard labels at T = 1
    return alpha * T * T * kl / batch + (1 - alpha) * ce / batch


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_kd_loss_matches_the_closed_form(T, alpha):
    zs, zt, y = _logits(seed=int(T * 10 + alpha * 100))
    got = kd_loss(zs, zt, y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(_by_hand(zs, zt, y, T, alpha), rel=1e-10, abs=1e-12)


def test_alpha_zero_is_plain_cross_entropy():
    zs, zt, y = _logits(seed=3)
    for T in (1.0, 4.0, 20.0):
        assert torch.equal(kd_loss(zs, zt, y, temperature=T, alpha=0.0), F.cross_entropy(zs, y))


def test_student_equal_to_teacher_has_no_soft_loss():
    zs, _, y = _logits(seed=4)
    assert kd_loss(zs, zs.clone(), y, temperature=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert kd_loss(zs, zs + 7.0, y, temperature=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)


def _soft_grad(zs, zt, T, *, scaled=True):
    z = zs.clone().requires_grad_(True)
    y = torch.zeros(len(zs), dtype=torch.long)
    loss = kd_loss(z, zt, y, temperature=T, alpha=1.0)
    (loss if scaled else loss / T ** 2).backward()
    return z.grad


def test_t_squared_keeps_the_soft_gradient_scale():
    zs, zt, _ = _logits(seed=5, batch=8, classes=10, scale=2.0)
    norms = {T: _soft_grad(zs, zt, T).norm().item() for T in (10.0, 20.0, 40.0, 80.0)}
    # With T^2 the gradient settles to a T-independent value as T grows...
    assert norms[20.0] / norms[80.0] == pytest.approx(1.0, abs=0.02)
    assert norms[40.0] / norms[80.0] == pytest.approx(1.0, abs=0.005)
    # ... which is the logit-matching gradient (z_s - z_t, each centred) / (classes * batch) ...
    centred = lambda z: z - z.mean(dim=1, keepdim=True)
    limit = (centred(zs) - centred(zt)) / (zs.shape[1] * zs.shape[0])
    # (the next term of the expansion in 1/T is of relative size max|z| / T)
    assert torch.allclose(_soft_grad(zs, zt, 1e4), limit, rtol=0, atol=1e-3 * limit.abs().max().item())
    # ... while without T^2 it would shrink as 1/T^2: doubling T quarters it.
    raw = {T: _soft_grad(zs, zt, T, scaled=False).norm().item() for T in (40.0, 80.0)}
    assert raw[40.0] / raw[80.0] == pytest.approx(4.0, rel=0.01)


def test_soft_targets_flatten_with_temperature():
    z = torch.tensor([[5.0, 2.0, 0.0, -1.0]])
    p1, p4, p20 = (soft_targets(z, temperature=T) for T in (1.0, 4.0, 20.0))
    assert torch.allclose(p1, torch.softmax(z, dim=1))
    assert torch.allclose(p4.sum(), torch.tensor(1.0))
    assert p1[0, 0] > p4[0, 0] > p20[0, 0] > 0.25  # the top class loses mass, never its rank
    assert torch.equal(p20.argsort(), p1.argsort())
    assert (p20.max() - p20.min()) < (p4.max() - p4.min()) < (p1.max() - p1.min())


@pytest.mark.parametrize("T", [0, 0.0, -1.0, float("nan"), float("inf"), True, "4", None])
def test_bad_temperature_is_refused(T):
    zs, zt, y = _logits(seed=6)
    with pytest.raises(WorkbenchError, match="temperature must be"):
        kd_loss(zs, zt, y, temperature=T, alpha=0.5)
    with pytest.raises(WorkbenchError, match="temperature must be"):
        soft_targets(zs, temperature=T)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_alpha_is_refused(alpha):
    zs, zt, y = _logits(seed=7)
    with pytest.raises(WorkbenchError, match=r"alpha .* must be in \[0, 1\]"):
        kd_loss(zs, zt, y, temperature=4.0, alpha=alpha)


def test_mismatched_logits_are_refused():
    zs, zt, y = _logits(seed=8)
    with pytest.raises(WorkbenchError, match="both be \\(batch, classes\\)"):
        kd_loss(zs, zt[:, :3], y, temperature=4.0, alpha=0.5)


# -- the distillation loop ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def teacher(digits):
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, seed=0, hidden=(64,), dropout=0.2)
    fit(model, digits, epochs=3, seed=0, progress=False)
    return model


def _student(digits):
    return build("mlp", input_shape=digits.input_shape, num_classes=10, seed=1, hidden=(16,))


def test_distill_is_deterministic_and_leaves_the_teacher_alone(digits, teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # whatever mode the caller left it in comes back
    for p in teacher.parameters():
        p.grad = None  # (fit left the last step's gradients): distillation must add none
    runs = []
    for _ in range(2):
        student = _student(digits)
        hist = distill(student, teacher, digits, temperature=4.0, alpha=0.7, epochs=2, seed=3, progress=False)
        runs.append((hist, student.state_dict(), evaluate(student, digits.X_test, digits.y_test)))
    (h1, s1, e1), (h2, s2, e2) = runs
    assert h1.train_loss == h2.train_loss and h1.val_acc == h2.val_acc and e1 == e2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    teacher.eval()


def test_distill_trains_on_the_kd_loss(digits, teacher):
    plain, kd = _student(digits), _student(digits)
    h_plain = fit(plain, digits, epochs=2, seed=3, progress=False)
    h_kd = distill(kd, teacher, digits, temperature=4.0, alpha=0.9, epochs=2, seed=3, progress=False)
    assert h_kd.train_loss != h_plain.train_loss
    # alpha = 0 ignores the teacher: exactly plain training with the same seed.
    same = _student(digits)
    h_same = distill(same, teacher, digits, temperature=4.0, alpha=0.0, epochs=2, seed=3, progress=False)
    assert h_same.train_loss == h_plain.train_loss
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), plain.parameters()))


def test_distill_refuses_bad_settings(digits, teacher):
    with pytest.raises(WorkbenchError, match="temperature must be"):
        distill(_student(digits), teacher, digits, temperature=0, epochs=1, progress=False)
    with pytest.raises(WorkbenchError, match="alpha"):
        distill(_student(digits), teacher, digits, alpha=2, epochs=1, progress=False)
    with pytest.raises(WorkbenchError, match="sets fit's `loss`"):
        distill(_student(digits), teacher, digits, epochs=1, progress=False, loss=lambda z, i: z.sum())
    wrong = build("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(8,))
    with pytest.raises(WorkbenchError, match="failed on a batch"):
        distill(_student(digits), wrong, digits, epochs=1, progress=False)


# -- through the pipeline ----------------------------------------------------------------------

def test_recipe_with_a_teacher_runs_and_reports_the_teacher(tmp_path):
    teacher = Recipe(**TEACHER)
    student = Recipe(**FAST, teacher=teacher, kd_temperature=4.0, kd_alpha=0.9)
    res = run(student, cache=tmp_path, progress=False)
    t_res = run(teacher, cache=tmp_path, progress=False)
    assert t_res.cached  # trained (and cached) by the student's run
    assert res.teacher_accuracy == t_res.accuracy and 0.1 < res.teacher_accuracy <= 1.0
    assert res.params < t_res.params
    alone = run(student.replace(teacher=None), cache=tmp_path, progress=False)
    assert alone.teacher_accuracy is None and alone.key != res.key
    assert alone.history["train_loss"] != res.history["train_loss"]
    again = run(student, cache=tmp_path, use_cache=False, progress=False)
    assert (again.accuracy, again.history["train_loss"]) == (res.accuracy, res.history["train_loss"])
    assert run(student, cache=tmp_path, progress=False).cached


def test_recipe_teacher_round_trips_as_a_dict():
    student = Recipe(**FAST, teacher=Recipe(**TEACHER).to_dict())
    assert student.teacher == Recipe(**TEACHER)
    assert Recipe.from_dict(student.to_dict()) == student


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(teacher=Recipe(**TEACHER | {"dataset": "digits28"})), "distillation needs the same data"),
        (dict(teacher="cnn"), "Recipe.teacher must be a Recipe"),
        (dict(teacher=Recipe(**TEACHER), kd_temperature=0.0), "kd_temperature must be a finite number > 0"),
        (dict(teacher=Recipe(**TEACHER), kd_temperature=-2), "kd_temperature must be a finite number > 0"),
        (dict(teacher=Recipe(**TEACHER), kd_temperature=float("inf")), "kd_temperature must be a finite number > 0"),
        (dict(teacher=Recipe(**TEACHER), kd_alpha=1.5), r"kd_alpha must be a finite number >= 0 and <= 1"),
        (dict(teacher=Recipe(**TEACHER), kd_alpha=-0.1), r"kd_alpha must be a finite number >= 0 and <= 1"),
    ],
)
def test_bad_distillation_recipes_are_refused(changes, message):
    with pytest.raises(WorkbenchError, match=message):
        Recipe(**FAST | changes)

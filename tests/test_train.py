"""Training: determinism, the LR-schedule hook, evaluation, and bad arguments."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from workbench import WorkbenchError, build, load
from workbench.train import Evaluation, evaluate, fit


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _mlp(digits, seed=0):
    return build("mlp", input_shape=digits.input_shape, num_classes=10, seed=seed, hidden=(32,), dropout=0.1)


def test_same_seed_same_numbers(digits):
    runs = []
    for _ in range(2):
        model = _mlp(digits)
        hist = fit(model, digits, epochs=3, seed=7, progress=False)
        runs.append((hist, evaluate(model, digits.X_test, digits.y_test), model.state_dict()))
    (h1, e1, s1), (h2, e2, s2) = runs
    assert h1.train_loss == h2.train_loss and h1.val_acc == h2.val_acc
    assert e1 == e2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = _mlp(digits)
    h3 = fit(other, digits, epochs=3, seed=8, progress=False)
    assert h3.train_loss != h1.train_loss


def test_fit_learns_and_records_history(digits):
    model = _mlp(digits)
    hist = fit(model, digits, epochs=5, lr=3e-3, progress=False)
    assert hist.epochs == 5 and len(hist.val_acc) == len(hist.lr) == len(hist.seconds) == 5
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert evaluate(model, digits.X_test, digits.y_test).accuracy > 0.85
    assert not model.training


def test_global_rng_is_left_alone(digits):
    before = torch.random.get_rng_state()
    fit(_mlp(digits), digits, epochs=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_lr_schedule_hook_is_lambda_lr_per_step(digits):
    steps_per_epoch = -(-len(digits.X_train) // 64)
    seen = []
    hist = fit(_mlp(digits), digits, epochs=2, lr=0.1, optimizer="sgd", progress=False,
               lr_schedule=lambda step: 0.5 ** step, on_step=lambda m: seen.append(1))
    assert len(seen) == 2 * steps_per_epoch
    assert hist.lr[0] == pytest.approx(0.1 * 0.5 ** steps_per_epoch)
    assert hist.lr[1] == pytest.approx(0.1 * 0.5 ** (2 * steps_per_epoch))


def test_evaluate_matches_a_hand_computation(digits):
    model = _mlp(digits)
    ev = evaluate(model, digits.X_val, digits.y_val)
    with torch.no_grad():
        logits = model(digits.X_val)
    correct = int((logits.argmax(1) == digits.y_val).sum())
    assert ev.correct == correct and ev.n == len(digits.y_val)
    assert ev.accuracy == correct / len(digits.y_val)  # the exact ratio, correctly rounded: no float32 mean
    assert ev.loss == pytest.approx(F.cross_entropy(logits, digits.y_val).item(), rel=1e-5)


def test_accuracy_is_an_exact_ratio_where_a_float32_mean_is_not():
    # The bug this prevents: 342 of 360 right is exactly 0.95, but a float32 mean reads 0.94999999.
    y = torch.zeros(360, dtype=torch.long)
    logits = torch.zeros(360, 2)
    logits[342:, 1] = 1.0                       # the last 18 predict class 1: wrong
    ev = Evaluation.from_logits(logits, y)
    assert (ev.correct, ev.n) == (342, 360) and ev.accuracy >= 0.95
    assert float((logits.argmax(1) == y).float().mean()) < 0.95


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(batch_size=0), "batch_size"),
     (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'")],
)
def test_bad_arguments(digits, kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        fit(_mlp(digits), digits, progress=False, **kwargs)


def test_model_that_does_not_fit_the_data_gets_a_clear_error(digits):
    with pytest.raises(WorkbenchError, match="failed on a batch of shape") as info:
        fit(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), digits, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)  # the user's model's own error stays attached
    with pytest.raises(WorkbenchError, match=r"expected \(2, 10\)"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), digits, progress=False)

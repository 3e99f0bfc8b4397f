"""Grading: each kind of wrong answer gives score 0 (or partial credit) and one line naming the problem,
checked on toy functions and on readers' versions of the book's from-scratch pieces."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from workbench import WorkbenchError, grading, prune, quant, schedules
from workbench.grading import STRICT_ENV, Grade, case, check

GEN = torch.Generator().manual_seed(0)
X = torch.randn(4, 8, generator=GEN)


def double(x):
    return x * 2


def _one_line_zero(grade: Grade, *needles: str) -> None:
    line = str(grade)
    assert "\n" not in line and line.startswith(f"✗ {grade.name}: ")
    assert grade.score == 0 and not grade.passed and grade.earned == 0
    for needle in needles:
        assert needle in line, line


def test_a_correct_function_passes():
    g = check("double", lambda x: x + x, double, [case(X), case(X[:2]), case(torch.zeros(3))])
    assert g.passed and g.score == 1 and g.earned == 1
    assert str(g) == repr(g) == "✓ double: 3/3 cases"
    assert "✓ double: 3/3 cases" in g._repr_html_()
    assert [r.kind for r in g.details] == ["ok"] * 3


@pytest.mark.parametrize(("student", "needles"), [
    (lambda x: (x * 2).T, ["wrong shape", "got (8, 4), expected (4, 8)", "case 1 (x of shape (4, 8))"]),
    (lambda x: (x * 2).double(), ["wrong dtype: got torch.float64, expected torch.float32"]),
    (lambda x: (x * 2).numpy(), ["wrong type: got numpy.ndarray, expected torch.Tensor", "torch.from_numpy"]),
    (lambda x: [x * 2], ["wrong type: got list, expected torch.Tensor"]),
    (lambda x: 1 / 0, ["raised ZeroDivisionError: division by zero", "case 1"]),
    (lambda x: x.reshape(3, 3), ["raised RuntimeError: shape '[3, 3]' is invalid"]),
])
def test_each_wrong_answer_scores_zero_in_one_line(student, needles):
    _one_line_zero(check("double", student, double, [case(X)]), *needles)


def test_off_by_a_measured_amount():
    g = check("double", lambda x: x * 2 + 0.01, double, [case(X)])
    _one_line_zero(g, "wrong values", "32 of 32 entries off", "max abs error 0.01", "+0.01 everywhere")
    g = check("double", lambda x: torch.where(x.abs() == x.abs().max(), x * 2.5, x * 2), double, [case(X)])
    i = tuple(int(v) for v in np.unravel_index(int(X.abs().argmax()), X.shape))
    err = float(X.abs().max()) * 0.5
    _one_line_zero(g, "1 of 32 entries off", f"max abs error {err:.6g} at index {i}")
    _one_line_zero(check("double", lambda x: x / x[0, 0] * 0 / 0, double, [case(X)]), "32 of 32 entries are NaN")


def test_the_tolerance_scales_with_the_reference_and_is_exact_for_integers():
    big = torch.full((5,), 1e4)
    assert check("t", lambda x: x + 0.005, lambda x: x, [case(big)]).passed  # 0.005 < 1e-6 * 1e4 + 1e-5 * 1e4
    assert not check("t", lambda x: x + 0.005, lambda x: x, [case(torch.ones(5))]).passed
    assert check("t", lambda x: x + 0.005, lambda x: x, [case(torch.ones(5))], atol=0.01).passed
    ints = torch.arange(6)
    _one_line_zero(check("t", lambda x: x + 1, lambda x: x, [case(ints)]), "6 of 6 entries differ",
                   "max abs error 1")
    masks = torch.tensor([True, False, True])
    _one_line_zero(check("t", lambda m: ~m, lambda m: m, [case(masks)]), "got 1 True, expected 2")


def test_not_yet_solved_is_its_own_message():
    def stub(x):
        raise NotImplementedError

    def empty(x):
        pass

    for fn in (stub, empty, lambda x: ..., None, ...):
        g = check("double", fn, double, [case(X), case(X)])
        _one_line_zero(g, "not yet solved")
        assert "raised" not in str(g)
    _one_line_zero(check("double", 3, double, [case(X)]), "expected a function, got int")
    # None where the reference returns a value in only one case is a wrong answer, said so.
    _one_line_zero(check("double", lambda x: None if x.shape[0] == 2 else x * 2, double, [case(X), case(X[:2])]),
                   "case 2", "got None, expected torch.Tensor", "`return` missing")


def test_changing_the_input_is_reported_and_cannot_corrupt_the_reference():
    x = X.clone()
    g = check("double", lambda x: x.mul_(2), double, [case(x)])
    _one_line_zero(g, "changed its input x in place", "x.clone()")
    assert torch.equal(x, X)  # the caller's tensor is untouched too
    seen = []
    check("double", lambda x: x.zero_(), lambda x: seen.append(x.clone()) or x * 2, [case(x)])
    assert torch.equal(seen[0], X)


def test_an_in_place_exercise_compares_the_inputs_after_the_call():
    def ref(x):
        x.mul_(2)

    assert check("double_", lambda x: (x.mul_(2), None)[1], ref, [case(X)], inplace=True).passed
    _one_line_zero(check("double_", lambda x: (x.mul_(3), None)[1], ref, [case(X)], inplace=True),
                   "wrong values of x", "1.5 × expected")


def test_containers_are_compared_recursively():
    def ref(x):
        return x.min(), x.max()

    assert check("range", lambda x: (x.min(), x.max()), ref, [case(X)]).passed
    _one_line_zero(check("range", lambda x: [x.min(), x.max()], ref, [case(X)]),
                   "wrong type: got list, expected tuple")
    _one_line_zero(check("range", lambda x: (x.min(),), ref, [case(X)]), "wrong length: got 1 items, expected 2")
    _one_line_zero(check("range", lambda x: (x.min(), x.max().double()), ref, [case(X)]),
                   "wrong dtype of output[1]: got torch.float64")

    def stats(x):
        return {"mean": float(x.mean()), "count": x.numel()}

    _one_line_zero(check("stats", lambda x: {"mean": float(x.mean()), "n": x.numel()}, stats, [case(X)]),
                   "wrong keys: missing 'count'; unexpected 'n'")
    _one_line_zero(check("stats", lambda x: {"mean": float(x.mean()), "count": float(x.numel())}, stats, [case(X)]),
                   "wrong type of output['count']: got float, expected int")
    _one_line_zero(check("stats", lambda x: {"mean": x.mean(), "count": x.numel()}, stats, [case(X)]),
                   "got torch.Tensor, expected float", ".item()")
    assert check("arr", lambda a: a * 2, lambda a: a * 2, [case(np.arange(4.0))]).passed
    _one_line_zero(check("arr", lambda a: a.astype(np.float32) * 2, lambda a: a * 2, [case(np.arange(4.0))]),
                   "wrong dtype: got float32, expected float64")


def test_partial_credit_for_values_but_zero_for_a_crash():
    cases = [case(torch.full((3,), float(v))) for v in range(4)]
    g = check("double", lambda x: x * 2 if x[0] < 2 else x * 3, double, cases, points=2)
    assert not g.passed and g.score == 0.5 and g.earned == 1.0
    assert str(g).startswith("✗ double: case 3 (x of shape (3,)): wrong values") and "[2/4 cases right]" in str(g)
    _one_line_zero(check("double", lambda x: x * 2 if x[0] < 3 else 1 / 0, double, cases), "case 4", "raised")


@pytest.fixture(autouse=True)
def _not_strict_from_the_environment(monkeypatch):
    # make book / make test set WORKBENCH_GRADING_STRICT=1 for the notebooks; these tests set it themselves.
    monkeypatch.delenv(STRICT_ENV, raising=False)


def test_strict_from_the_environment(monkeypatch):
    wrong = lambda x: x * 3  # noqa: E731
    assert not check("double", wrong, double, [case(X)]).passed          # unset: a reader's notebook never raises
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(AssertionError, match="double"):
        check("double", wrong, double, [case(X)])
    with pytest.raises(AssertionError, match="not yet solved"):
        check("double", None, double, [case(X)])
    assert not check("double", wrong, double, [case(X)], strict=False).passed   # an explicit False wins
    monkeypatch.setenv(STRICT_ENV, "0")
    assert not check("double", wrong, double, [case(X)]).passed


def test_strict_mode_raises_the_one_line():
    with pytest.raises(AssertionError, match=r"^✗ double: case 1 \(x of shape \(4, 8\)\): wrong dtype"):
        check("double", lambda x: (x * 2).double(), double, [case(X)], strict=True)
    assert check("double", double, double, [case(X)], strict=True).passed


def test_a_custom_compare_hook():
    def same_sign(got, expected):
        return None if torch.equal(got.sign(), expected.sign()) else "the signs differ"

    assert check("sign", lambda x: x * 5, double, [case(X)], compare=same_sign).passed
    g = check("sign", lambda x: -x, double, [case(X)], compare=same_sign)
    assert str(g) == "✗ sign: case 1 (x of shape (4, 8)): the signs differ" and g.score == 0
    _one_line_zero(check("sign", lambda x: "oops", double, [case(X)], compare=same_sign), "could not check")


def test_a_reference_that_raises_is_blamed_on_the_exercise_and_bad_settings_on_the_author():
    _one_line_zero(check("bad", double, lambda x: 1 / 0, [case(X)]), "fault in the exercise")
    with pytest.raises(WorkbenchError, match="no cases"):
        check("double", double, double, [])
    with pytest.raises(WorkbenchError, match="points"):
        check("double", double, double, [case(X)], points=0)


def test_a_time_limit_stops_an_endless_loop():
    def forever(x):
        while True:
            pass

    _one_line_zero(check("double", forever, double, [case(X)], timeout=0.2), "took longer than 0.2 s")


def test_report_and_total():
    grades = [check("double", double, double, [case(X)], points=2),
              check("triple", lambda x: x * 2, lambda x: x * 3, [case(X)]),
              check("half", lambda x: x / 2 if x.numel() > 3 else x, lambda x: x / 2, [case(X), case(torch.ones(2))])]
    assert grading.total(grades) == (2.5, 4.0)
    table = grading.report(grades).splitlines()
    assert table[0].split() == ["exercise", "points", "result"]
    assert table[1].split()[:3] == ["double", "2/2", "✓"] and table[2].split()[:3] == ["triple", "0/1", "✗"]
    assert table[3].split()[:2] == ["half", "0.5/1"] and table[-1].split() == ["total", "2.5/4", "62%"]


# ---- readers' versions of the book's from-scratch pieces ---------------------------------------------------

def _reader_scale_zero_point(x, *, bits, off_by_one_bit=False):
    qmin, qmax = 0, 2 ** (bits - 1 if off_by_one_bit else bits) - 1
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zero_point


def _ref_scale_zero_point(x, *, bits):
    qp = quant.compute_qparams(x, bits=bits, symmetric=False)
    return qp.scale, qp.zero_point


QCASES = [case(torch.randn(4, 8, generator=GEN) * s + m, bits=b) for b in (8, 4) for s, m in ((1, 0), (3, 2), (0.1, -1))]


def test_a_readers_scale_and_zero_point():
    assert str(check("scale_and_zero_point", _reader_scale_zero_point, _ref_scale_zero_point, QCASES)) == \
        "✓ scale_and_zero_point: 6/6 cases"
    g = check("scale_and_zero_point", lambda x, bits: _reader_scale_zero_point(x, bits=bits, off_by_one_bit=True),
              _ref_scale_zero_point, QCASES)
    right, _ = _ref_scale_zero_point(QCASES[0].args[0], bits=8)
    wrong, _ = _reader_scale_zero_point(QCASES[0].args[0], bits=8, off_by_one_bit=True)
    _one_line_zero(g, "case 1 (x of shape (4, 8), bits=8): wrong value of output[0]",
                   f"abs error {abs(float(wrong) - float(right)):.6g}", "got/expected = 2.008")  # 255 / 127
    g = check("scale_and_zero_point", lambda x, bits: tuple(t.double() for t in _reader_scale_zero_point(x, bits=bits)),
              _ref_scale_zero_point, QCASES)
    assert str(g) == ("✗ scale_and_zero_point: case 1 (x of shape (4, 8), bits=8): wrong dtype of output[0]: "
                      "got torch.float64, expected torch.float32")


def _reader_cosine(step, *, base_lr, total_steps, min_lr=0.0, clamp=True):
    t = min(step, total_steps) if clamp else step
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * t / total_steps)) / 2


def _ref_cosine(step, *, base_lr, total_steps, min_lr=0.0):
    return schedules.Schedule("cosine", total_steps, min_lr_ratio=min_lr / base_lr).lr(step, base_lr)


def test_a_readers_cosine_schedule():
    cases = [case(t, base_lr=0.1, total_steps=10, min_lr=m) for m in (0.0, 0.01) for t in (0, 3, 5, 10, 12, 15)]
    assert check("cosine_lr", _reader_cosine, _ref_cosine, cases).passed
    g = check("cosine_lr", lambda step, **kw: _reader_cosine(step, clamp=False, **kw), _ref_cosine, cases)
    assert g.score == pytest.approx(8 / 12) and "case 5 (step=12, base_lr=0.1, total_steps=10, min_lr=0.0)" in str(g)
    _one_line_zero(check("cosine_lr", lambda step, **kw: torch.tensor(_reader_cosine(step, **kw)), _ref_cosine, cases),
                   "wrong type: got torch.Tensor, expected float")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _reader_global_masks(model, amount, *, dtype=torch.float32, per_layer=False, in_place=False):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if per_layer:
        return {n: (m.weight.abs() > m.weight.abs().flatten().kthvalue(round(amount * m.weight.numel())).values)
                .to(dtype) for n, m in layers.items()}
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    threshold = scores.kthvalue(round(amount * scores.numel())).values
    masks = {n: (m.weight.detach().abs() > threshold).to(dtype) for n, m in layers.items()}
    if in_place:
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.mul_(masks[n])
    return masks


def _ref_global_masks(model, amount):
    return prune.magnitude_masks(model, amount, scope="global")


def test_a_readers_global_magnitude_mask():
    cases = [case(_model(), a) for a in (0.3, 0.5, 0.9)]
    assert check("global_mask", _reader_global_masks, _ref_global_masks, cases).passed
    _one_line_zero(check("global_mask", lambda m, a: _reader_global_masks(m, a, dtype=torch.bool), _ref_global_masks,
                         cases), "case 1 (model: Sequential, amount=0.3)",
                   "wrong dtype of output['0']: got torch.bool, expected torch.float32")
    g = check("global_mask", lambda m, a: _reader_global_masks(m, a, per_layer=True), _ref_global_masks, cases)
    assert not g.passed and "wrong values of output['0']" in str(g) and "entries off" in str(g)
    _one_line_zero(check("global_mask", lambda m, a: _reader_global_masks(m, a, in_place=True), _ref_global_masks,
                         cases), "changed its input model.state_dict()['0.weight'] in place")

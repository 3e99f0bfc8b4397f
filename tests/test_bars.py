"""Bars: exact comparisons, one-line failures that name the configuration, and the accuracy margins."""

from fractions import Fraction

import pytest

from workbench import bars
from workbench.presets import BASELINES
from workbench.train import Evaluation


def test_counts_are_compared_exactly_at_the_boundary():
    bar = bars.Bar("acc", ">=", "0.95")                   # 342 of 360 is exactly 0.95
    assert bar.count_needed(360) == 342
    assert bar.holds(Evaluation(loss=0.0, correct=342, n=360))
    assert not bar.holds(Evaluation(loss=0.0, correct=341, n=360))
    assert bar.holds(Fraction(342, 360)) and bar.holds(342 / 360)  # a correctly rounded ratio passes too
    assert not bar.holds(0.949999988079071)                 # the float32 mean of 342 ones and 18 zeros


@pytest.mark.parametrize("op, limit, high, inside, outside", [
    (">=", "1.5", None, [1.5, 2], [1.49, float("nan")]),
    (">", "0", None, [Fraction(1, 360)], [0, -0.1]),
    ("<=", "0.5", None, [0.5, -1], [0.51]),
    ("<", "4", None, [3.99], [4]),
    ("in", "0.95", "1.1", [0.95, 1.0, 1.1], [0.94, 1.11]),
])
def test_every_operator(op, limit, high, inside, outside):
    bar = bars.Bar("x", op, limit, high=high)
    assert all(bar.holds(v) for v in inside) and not any(bar.holds(v) for v in outside)


def test_a_miss_is_one_line_with_figure_value_bar_and_configuration():
    with pytest.raises(bars.BarError) as err:
        bars.check("baseline_acc_mlp_digits", Evaluation(loss=0.0, correct=300, n=360))
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("baseline_acc_mlp_digits = 0.8333 (300/360 test images)")
    assert f"({bars.BARS['baseline_acc_mlp_digits']})" in text and "kernels" in text and "thread" in text
    assert bars.check("serve_errors", 0) == 0
    with pytest.raises(KeyError, match="no bar named"):
        bars.check("not_a_figure", 1.0)


def test_drop_is_exact_from_counts():
    before, after = Evaluation(0.0, 356, 360), Evaluation(0.0, 354, 360)
    assert bars.drop_pp(before, after) == Fraction(200, 360)
    assert bars.BARS["ptq_int8_acc_drop_pp"].holds(Fraction(100, 360))       # one image: 0.28 points
    assert not bars.BARS["ptq_int8_acc_drop_pp"].holds(bars.drop_pp(before, after))  # two: 0.56 > 0.5


def test_config_names_the_pinning_variables(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert "MKL_CBWR=AVX2" in bars.numeric_config()


def test_every_baseline_has_an_accuracy_bar_and_a_seed_twin():
    for name in BASELINES:
        assert bars.BARS[f"baseline_acc_{name}"].op == ">="
        assert bars.BARS[f"baseline_acc_{name}_seed_min"].limit == bars.BARS[f"baseline_acc_{name}"].limit
    needed = bars.BARS["baseline_acc_vit_digits"].count_needed(360)
    assert bars.margin_images("baseline_acc_vit_digits", needed + 3, 360) == 3


def test_bars_are_well_formed():
    with pytest.raises(ValueError):
        bars.Bar("x", "==", "1")
    with pytest.raises(ValueError):
        bars.Bar("x", "in", "1")
    for b in bars.BARS.values():
        Fraction(b.limit)  # every limit is an exact decimal

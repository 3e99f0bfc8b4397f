"""The update loop: promote a challenger only if it is at least as accurate and within the latency budget."""

from __future__ import annotations

import pytest
from test_serve_common import NAME, fresh_registry, results

from workbench import data
from workbench.errors import WorkbenchError
from workbench.serve.lifecycle import decide, update

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("kwargs, promoted, reason", [
    (dict(champion_accuracy=0.90, challenger_accuracy=0.91, challenger_p50_us=50), True, "at least as accurate"),
    (dict(champion_accuracy=0.90, challenger_accuracy=0.90, challenger_p50_us=50), True, "at least as accurate"),
    (dict(champion_accuracy=0.90, challenger_accuracy=0.89, challenger_p50_us=50), False, "less accurate"),
    (dict(champion_accuracy=0.90, challenger_accuracy=0.99, challenger_p50_us=150), False, "too slow"),
    (dict(champion_accuracy=None, challenger_accuracy=0.5, challenger_p50_us=50), True, "no champion yet"),
    (dict(champion_accuracy=0.90, challenger_accuracy=0.905, challenger_p50_us=50, min_gain=0.01), False,
     "less accurate"),
])
def test_decide(kwargs, promoted, reason):
    ok, why = decide(latency_budget_us=100, **kwargs)
    assert ok is promoted and reason in why


def test_decide_needs_a_budget():
    with pytest.raises(WorkbenchError, match="latency budget"):
        decide(champion_accuracy=None, challenger_accuracy=1.0, challenger_p50_us=1.0, latency_budget_us=0)


def test_update_loop_keeps_a_worse_challenger_out_and_promotes_a_good_one(tmp_path):
    good, weak = results()
    ds = data.load("digits")
    reg = fresh_registry(tmp_path / "registry")
    first = update(reg, NAME, reg.register_result(weak, name=NAME), ds.X_test, ds.y_test, latency_budget_us=1e6)
    assert first.promoted and first.champion_version is None  # nothing to beat
    # The better model, on the same held-out data: promoted.
    better = update(reg, NAME, reg.register_result(good, name=NAME), ds.X_test, ds.y_test, latency_budget_us=1e6)
    assert better.promoted and better.challenger_accuracy > better.champion_accuracy
    assert better.challenger_accuracy == pytest.approx(good.accuracy, abs=1e-6)
    assert reg.resolve(f"{NAME}@champion").version == 2
    # The weaker one again: kept out, with the reason recorded; the champion does not move.
    worse = update(reg, NAME, reg.register_result(weak, name=NAME), ds.X_test, ds.y_test, latency_budget_us=1e6)
    assert not worse.promoted and "less accurate" in worse.reason
    v3 = reg.get(NAME, 3)
    assert "less accurate" in v3.tags["rejected"] and "challenger" not in v3.aliases
    assert reg.resolve(f"{NAME}@champion").version == 2
    # An accurate challenger over the latency budget: kept out too.
    slow = update(reg, NAME, reg.register_result(good, name=NAME), ds.X_test, ds.y_test, latency_budget_us=0.001)
    assert not slow.promoted and "too slow" in slow.reason
    # Rollback puts the previous champion back.
    assert reg.rollback(NAME).version == 1

"""The update loop: promote a challenger only if it is at least as accurate and within the latency budget."""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_serve_common import NAME, fresh_registry, results

from workbench import data
from workbench.errors import WorkbenchError
from workbench.serve.lifecycle import Poller, decide, update

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


def test_polling_tries_a_version_that_fails_to_load_once_and_keeps_serving(tmp_path, caplog):
    from workbench.serve.app import ModelServer, ServeSettings
    from workbench.serve.models import RegistrySource

    good, weak = results()
    reg = fresh_registry(tmp_path / "registry")
    reg.register_result(good, name=NAME, alias=None)
    v2 = reg.register_result(weak, name=NAME)
    reg.promote(NAME, 1)
    server = ModelServer(RegistrySource(f"{NAME}@champion", registry=reg), ServeSettings(poll_seconds=0))
    loads = []
    load = server.source.load
    server.source.load = lambda threads=1: loads.append(1) or load(threads)
    # Version 2's file changes, and the alias is moved to it behind the registry's checks (MLflow's UI, an
    # old client): the server must refuse it, keep version 1, and not retry it on every poll.
    path = reg.local_path(v2)
    path.write_bytes(path.read_bytes()[:-20] + bytes(20))
    reg.client.set_registered_model_alias(NAME, "champion", "2")
    poller = Poller(server.source, server.reload)

    async def polls(n):
        return [await poller.step() for _ in range(n)]

    with caplog.at_level(logging.ERROR, logger="workbench.serve"):
        assert asyncio.run(polls(5)) == [None] * 5
    assert len(loads) == 1 and server.model.version == 1
    retries = [r for r in caplog.records if "not retrying until the registry changes" in r.getMessage()]
    assert len(retries) == 1 and "version 2 of" in retries[0].getMessage()
    assert "sha256 mismatch" in retries[0].getMessage() and not any(r.exc_info for r in caplog.records)
    # The registry changes (a good version 3 is promoted): tried at once, and swapped.
    reg.register_result(good, name=NAME)
    reg.promote(NAME, 3)
    assert asyncio.run(polls(1)) == [{"swapped": True, "version": 3, "previous": 1}]
    assert server.model.version == 3 and len(loads) == 2 and poller.failed is None

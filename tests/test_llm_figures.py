"""workbench.llm.figures: the measuring script runs end to end (on a tiny model, in a temporary cache)."""

from __future__ import annotations

import math

from workbench.llm import TrainConfig
from workbench.llm.figures import measure


def test_measure_runs_on_a_tiny_model(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    tiny = TrainConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, steps=20, batch_size=8, warmup_steps=2)
    fig = measure(tiny, n_calib=4, max_val_chars=4000, progress=False)
    assert fig["sha256"] and fig["python_version"] and fig["chars"] > 300_000
    assert fig["bits_per_weight"]["int4 g32"] == 5.0
    assert {"int3 per-channel gptq", "2:4 sparsegpt", "w8a8 per-tensor smoothquant"} <= set(fig["delta_bpc"])
    assert all(math.isfinite(v) for v in fig["delta_bpc"].values())
    assert (tmp_path / "llm" / fig["model_key"] / "meta.json").exists()

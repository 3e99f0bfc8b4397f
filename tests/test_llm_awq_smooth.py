"""workbench.llm.calib/awq/smooth: exact scale folding, AWQ against RTN, SmoothQuant and activation statistics."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.llm import (GPT, GPTConfig, WeightQuant, activation_stats, awq, awq_search, fold_scale, layer_error,
                           quantize_weights, rtn, smoothquant, smoothquant_scale, w8a8)
from workbench.llm.calib import block_linears, collect_inputs
from workbench.quant import FakeQuantLayer


def tiny():
    m = GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking LayerNorms and biases, not the identity init
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return m


def calib():
    return torch.randint(0, 12, (8, 16), generator=torch.Generator().manual_seed(0))


def f32_tol(out: torch.Tensor) -> float:
    # a few hundred float32 roundings of values of this size: far below any quantization step
    return 1e-5 * float(out.detach().abs().max()) + 1e-6


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc"])
def test_folding_a_scale_leaves_the_fp_model_unchanged(name):
    m = tiny()
    x = calib()
    ref = m(x)
    s = torch.exp(torch.randn(block_linears(m)[name].in_features, generator=torch.Generator().manual_seed(2)))
    fold_scale(m, name, s)
    out = m(x)
    assert (out - ref).abs().max() <= f32_tol(ref)
    with pytest.raises(WorkbenchError, match="nonlinearity"):
        fold_scale(m, "blocks.0.mlp.proj", s[:1].repeat(128))


def test_awq_leaves_fp_unchanged_and_beats_rtn_on_calibration_rows():
    m = tiny()
    spec = WeightQuant(3, 16)
    scaled, alphas = awq(m, calib(), spec, grid=11)
    x = calib()
    ref = m(x)
    assert (scaled(x) - ref).abs().max() <= f32_tol(ref)
    assert set(alphas) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc")}
    st = collect_inputs(m, calib(), ["blocks.0.mlp.fc"], keep_rows=10_000)["blocks.0.mlp.fc"]
    w = m.blocks[0].mlp.fc.weight
    s, alpha, err = awq_search(w, st.rows, st.absmean, spec, grid=11)
    assert err <= layer_error(w, rtn(w, spec)[0], st.rows)  # alpha = 0 is RTN: never worse on these rows
    q, packed = quantize_weights(scaled, spec)
    assert len(packed) == 8


def test_smoothquant_leaves_fp_unchanged_and_w8a8_wraps_every_block_linear():
    m = tiny()
    smoothed, alphas = smoothquant(m, calib())
    x = calib()
    ref = m(x)
    assert (smoothed(x) - ref).abs().max() <= f32_tol(ref)
    assert all(0.0 <= a <= 1.0 for a in alphas.values())
    q = w8a8(smoothed, calib())
    assert sum(isinstance(mod, FakeQuantLayer) for mod in q.modules()) == 8
    assert float((q(x) - ref).detach().abs().max()) < 0.2 * float(ref.detach().abs().max())


def test_smoothquant_scale_closed_form():
    w = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    xmax = torch.tensor([9.0, 1.0])
    torch.testing.assert_close(smoothquant_scale(w, xmax, 0.5), torch.tensor([3.0 / 1.0, 1.0 / 2.0]))


def test_activation_stats_are_per_channel_max_and_median():
    m = tiny()
    stats = activation_stats(m, calib())
    rows = collect_inputs(m, calib(), ["blocks.1.attn.qkv"], keep_rows=10_000)["blocks.1.attn.qkv"].rows
    s = stats["blocks.1.attn.qkv"]
    torch.testing.assert_close(s.absmax, rows.abs().amax(0))
    torch.testing.assert_close(s.median, rows.abs().median(0).values)
    assert s.outlier_ratio >= 1.0

"""workbench.llm.sparsify: 2:4 masks, Wanda's closed form, SparseGPT against magnitude."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.llm import GPT, GPTConfig, layer_error, nm_mask, row_mask, sparsegpt, sparsify, wanda_scores
from workbench.llm.calib import block_linears, collect_inputs
from workbench.prune import _smallest_mask


def tiny():
    return GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32), seed=0).eval()


def calib(n=8):
    return torch.randint(0, 12, (n, 16), generator=torch.Generator().manual_seed(0))


def correlated_inputs(seed: int, n: int = 512, d: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mix) * torch.exp(torch.randn(d, generator=g))


def two_of_four(w: torch.Tensor) -> bool:
    groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
    return bool((groups == 2).all())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_2_4_has_exactly_two_zeros_in_every_four(method):
    pruned = sparsify(tiny(), method=method, nm=(2, 4), calib=calib())
    for name, layer in block_linears(pruned).items():
        assert two_of_four(layer.weight), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_half(method):
    pruned = sparsify(tiny(), method=method, amount=0.5, calib=calib())
    for name, layer in block_linears(pruned).items():
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    if method == "wanda":  # per output row
        w = pruned.blocks[0].mlp.fc.weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_wanda_scores_closed_form():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 1.0, -0.1, 4.0]])
    X = torch.tensor([[1.0, 0.0, 1.0, 2.0], [1.0, 1.0, -1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    norms = torch.tensor([3 ** 0.5, 1.0, 3 ** 0.5, 2.0])
    expected = torch.tensor([[3 ** 0.5, 2.0, 3 * 3 ** 0.5, 1.0], [3 ** 0.5, 1.0, 0.1 * 3 ** 0.5, 8.0]])
    torch.testing.assert_close(wanda_scores(w, norms), expected)
    # the norms the model collects are ||X_j||_2 over every calibration row
    m = tiny()
    stats = collect_inputs(m, calib(), ["blocks.1.mlp.proj"], keep_rows=10_000)["blocks.1.mlp.proj"]
    torch.testing.assert_close(stats.col_norm, stats.rows.double().norm(dim=0).float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(row_mask(expected, 0.5), torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]))
    assert torch.equal(nm_mask(expected, 2, 4), row_mask(expected, 0.5))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude(nm):
    for seed in range(3):
        X = correlated_inputs(seed)
        w = torch.randn(64, 128, generator=torch.Generator().manual_seed(50 + seed))
        H = 2 * X.T @ X / len(X)
        s = sparsegpt(w, H, amount=0.5, nm=nm)
        mag = w * (nm_mask(w.abs(), *nm) if nm else _smallest_mask(w.abs(), 0.5))
        assert float((s == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        if nm:
            assert two_of_four(s)
        assert layer_error(w, s, X) <= layer_error(w, mag, X)


def test_bad_input():
    m = tiny()
    for fn, match in [
        (lambda: sparsify(m, method="wanda", calib=torch.zeros(0, 16, dtype=torch.long)), "no rows"),
        (lambda: sparsify(m, method="wanda"), "needs a calibration set"),
        (lambda: sparsify(m, method="magnitude", nm=(2, 5)), "multiple of 5"),
        (lambda: sparsify(m, method="magnitude", amount=1.5), "fraction"),
        (lambda: sparsify(m, method="random"), "unknown pruning method"),
    ]:
        with pytest.raises(WorkbenchError, match=match) as exc:
            fn()
        assert "\n" not in str(exc.value)

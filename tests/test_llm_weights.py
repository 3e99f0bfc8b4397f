"""workbench.llm.weights: RTN against workbench.quant, GPTQ against RTN, packing and bits per weight."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.llm import (GPT, GPTConfig, WeightQuant, calibration_ids, closed_form_bits_per_weight, gptq,
                           layer_error, load_corpus, memory, pack, pack_bits, quantize_weights, rtn, unpack_bits)
from workbench.llm.calib import collect_inputs
from workbench.quant import compute_qparams, fake_quantize

SPECS = [WeightQuant(8), WeightQuant(4, 32), WeightQuant(4, 64, symmetric=False), WeightQuant(3, 128),
         WeightQuant(2, 32, symmetric=False), WeightQuant(3)]


def correlated_inputs(seed: int, n: int = 512, d: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    scale = torch.exp(torch.randn(d, generator=g))  # uneven channels, as activations are
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_rtn_is_workbench_quant(spec):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    w_hat, codes, qp = rtn(w, spec)
    ref = fake_quantize(w, compute_qparams(w, bits=spec.bits, symmetric=spec.symmetric, axis=0,
                                           group_size=spec.group_size))
    assert torch.equal(w_hat, ref)
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_gptq_never_worse_than_rtn(spec):
    for seed in range(3):
        X = correlated_inputs(seed)
        w = torch.randn(64, 128, generator=torch.Generator().manual_seed(100 + seed))
        H = 2 * X.T @ X / len(X)
        # At 2 bits the default damping (1% of the mean diagonal) lets the error feedback overshoot on
        # these heavy-tailed channels (GPTQ is greedy, not optimal): 10% damping keeps it below RTN.
        e_gptq = layer_error(w, gptq(w, H, spec, percdamp=0.1 if spec.bits == 2 else 0.01)[0], X)
        e_rtn = layer_error(w, rtn(w, spec)[0], X)
        assert e_gptq <= e_rtn, (seed, e_gptq, e_rtn)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_gptq_with_diagonal_hessian_is_rtn_exactly(spec):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    diag = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(2)) + 0.5)
    for H in (torch.eye(256), diag):
        q, codes, qp = gptq(w, H, spec, blocksize=64)
        r, rcodes, rqp = rtn(w, spec)
        assert torch.equal(q, r) and torch.equal(codes, rcodes)
        assert torch.equal(qp.scale, rqp.scale) and torch.equal(qp.zero_point, rqp.zero_point)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 13, 16])
def test_pack_round_trip(bits):
    v = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(p, bits, 1001), v)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_packed_weight_dequantizes_to_the_model_weight_and_memory_matches_closed_form(spec):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    w_hat, codes, qp = rtn(w, spec)
    p = pack(codes, qp, symmetric=spec.symmetric)
    torch.testing.assert_close(p.dequantize(), w_hat, rtol=0, atol=1e-6 * float(w.abs().max()))
    g = spec.group_size or 256
    groups = 96 * 256 // g
    expected = -(-96 * 256 * spec.bits // 8) + 4 * groups + (0 if spec.symmetric else -(-groups * spec.bits // 8))
    assert p.nbytes == expected
    assert p.bits_per_weight == pytest.approx(closed_form_bits_per_weight(spec.bits, g, symmetric=spec.symmetric),
                                              abs=8 / (96 * 256) * 2)


def test_int4_g32_is_five_bits_per_weight():
    assert closed_form_bits_per_weight(4, 32, symmetric=True) == 5.0
    assert closed_form_bits_per_weight(4, 32, symmetric=False) == 5.125


def tiny():
    return GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32), seed=0).eval()


def calib():
    return torch.randint(0, 12, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_weights_on_a_model(method):
    m = tiny()
    q, packed = quantize_weights(m, WeightQuant(4, 32), method=method, calib=calib())
    assert set(packed) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    for name, p in packed.items():
        torch.testing.assert_close(p.dequantize(), q.get_submodule(name).weight, rtol=0, atol=1e-6)
    assert torch.equal(q.wte.weight, m.wte.weight)  # embeddings and the tied head stay fp
    mem = memory(packed)
    assert mem["bits_per_weight"] == pytest.approx(5.0)
    assert mem["bytes"] == sum(p.nbytes for p in packed.values())


def test_gptq_on_a_model_beats_rtn_on_its_calibration_inputs():
    m = tiny()
    c = calib()
    spec = WeightQuant(3, 32)
    q_rtn, _ = quantize_weights(m, spec)
    q_gptq, _ = quantize_weights(m, spec, method="gptq", calib=c)
    X = collect_inputs(m, c, ["blocks.0.mlp.fc"], keep_rows=10_000)["blocks.0.mlp.fc"].rows
    w = m.blocks[0].mlp.fc.weight
    assert layer_error(w, q_gptq.blocks[0].mlp.fc.weight, X) < layer_error(w, q_rtn.blocks[0].mlp.fc.weight, X)


def test_bad_input_is_one_line():
    m = tiny()
    cases = [
        (lambda: quantize_weights(m, WeightQuant(4, 48)), "group_size 48 does not divide the input width 32"),
        (lambda: WeightQuant(0), "bits must be an integer in 1..16"),
        (lambda: WeightQuant(17), "bits must be an integer in 1..16"),
        (lambda: quantize_weights(m, WeightQuant(4), method="gptq", calib=torch.zeros(0, 16, dtype=torch.long)),
         "calibration set has no rows"),
        (lambda: calibration_ids(load_corpus("abc" * 100), n_seqs=0, block_size=8), "calibration set has no rows"),
    ]
    for fn, match in cases:
        with pytest.raises(WorkbenchError, match=match) as exc:
            fn()
        assert "\n" not in str(exc.value)

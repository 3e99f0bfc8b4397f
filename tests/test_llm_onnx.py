"""workbench.llm.onnx_gpt: the GPT exported with past/present keys and values against GPT.step (chunk by chunk,
over a 64-step greedy generation, the cache passed between torch and ORT), int4 MatMulNBits models against
the torch model holding the same dequantized weights (and ORT's asymmetric RTN against workbench's), bits per
character through ORT, the speed helpers' shape (no timing asserts), and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import pytest
import torch

from workbench import onnx as wonnx
from workbench.errors import WorkbenchError
from workbench.llm import GPT, GPTConfig, KVCache, WeightQuant, evaluate_bpc, generate_tokens, quantize_weights, rtn
from workbench.llm import onnx_gpt as og

# Float32 agreement of torch and ORT on the same weights. u = 2**-24 ~ 6e-8; a length-n dot product errs by
# about sqrt(n) u relative in practice (n <= 128 here: ~7e-7), and the logits pass through a dozen matmuls,
# softmax, LayerNorm and GELU computed in different orders (MLAS vs torch's GEMM, explicit attention vs
# SDPA): ~1e-5 relative, i.e. 1e-4 on logits of size O(10). (Measured: 7e-6 on the trained default GPT,
# |logits| <= 8, over 64 greedy steps; 1e-7 on these small models.) The same bound holds for an int4 ORT model
# against torch with its dequantized weights: MatMulNBits (accuracy level unset) dequantizes each block to
# float32 and accumulates in float32.
ATOL = 1e-4


def model(kind: str) -> GPT:
    """Tiny random GPTs. "untied": head scaled x30 so logits are a few units and the greedy argmax has clear
    margins (a std-0.02 head gives near-uniform logits where float rounding could decide ties). "tied": the
    exporter folds the head's transposed weight into an initializer; "tied-wide-vocab": 260 x 64 > 8192
    values, shared with the embedding, so onnxscript keeps a Transpose node instead; both paths are named.
    Width 64: MatMulNBits blocks of 32, and asymmetric int4 needs an even number of them per column."""
    vocab = 260 if kind == "tied-wide-vocab" else 17
    m = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=64,
                      tie_weights=kind != "untied"), seed=0).eval()
    if kind == "untied":
        with torch.no_grad():
            m.lm_head.weight.mul_(30.0)
    return m


KINDS = ("untied", "tied", "tied-wide-vocab")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (torch model, fp32 path); one export per kind (~2-4 s each)."""
    d = tmp_path_factory.mktemp("onnx_gpt")
    out = {}
    for kind in KINDS:
        m = model(kind)
        out[kind] = (m, og.export_gpt(m, d / f"{kind}.onnx"))
    return out


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """(kind, method, symmetric) -> int4 path, made on demand."""
    d = tmp_path_factory.mktemp("onnx_gpt_int4")
    cache = {}

    def get(kind: str, method: str = "rtn", symmetric: bool = True, include_lm_head: bool = False):
        key = (kind, method, symmetric, include_lm_head)
        if key not in cache:
            m, path = exported[kind]
            calib = torch.randint(0, m.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
            cache[key] = og.quantize_int4(path, d / f"{'-'.join(map(str, key))}.onnx", method=method,
                                          symmetric=symmetric, include_lm_head=include_lm_head,
                                          calib=calib if method == "gptq" else None)
        return cache[key]

    return get


def ids(n: int, vocab: int = 17, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# fp32 graph against GPT.step


def test_graph_has_past_and_present_for_every_layer(exported):
    m, path = exported["untied"]
    proto = onnx.load(str(path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert list(dims) == og.input_names(2) == ["input_ids", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert dims["input_ids"] == ["batch", "new_tokens"]
    assert dims["past_key_1"] == ["batch", 2, "past_len", 32]
    assert [o.name for o in proto.graph.output] == og.output_names(2)
    assert {n.name for n in proto.graph.node if n.op_type == "MatMul"} >= {"blocks.0.attn.qkv", "blocks.1.mlp.proj",
                                                                         "lm_head"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", [(20,), (1,) * 20, (5, 1, 1, 4, 9)])
def test_steps_match_torch_as_the_cache_grows_from_empty(exported, kind, chunks):
    m, path = exported[kind]
    o = og.OrtGPT(path)
    x = ids(20, m.config.vocab_size)
    got, cache, ref_cache, at = [], None, None, 0
    with torch.no_grad():
        ref = m(x)
        for c in chunks:  # multi-token chunks after a cache need the offset causal mask inside the graph
            logits, cache = o.step(x[:, at:at + c], cache)
            _, ref_cache = m.step(x[:, at:at + c], ref_cache)
            assert cache.length == at + c
            got.append(logits)
            at += c
    assert float((torch.cat(got, 1) - ref).abs().max()) <= ATOL
    for (k, v), (rk, rv) in zip(cache.layers, ref_cache.layers):
        assert float((k - rk).abs().max()) <= ATOL and float((v - rv).abs().max()) <= ATOL


def test_64_step_greedy_generation_matches_torch_step_by_step(exported):
    m, path = exported["untied"]
    o = og.OrtGPT(path)
    prompt = ids(5, batch=1)
    worst = 0.0
    with torch.no_grad():
        lt, ct = m.step(prompt)
        lo, co = o.step(prompt)
        for _ in range(27):  # 5 + 27 = the context of 32; past that generate_tokens re-prefills (checked below)
            worst = max(worst, float((lt - lo).abs().max()))
            nt, no = lt[:, -1:].argmax(-1), lo[:, -1:].argmax(-1)
            assert torch.equal(nt, no)
            lt, ct = m.step(nt, ct)
            lo, co = o.step(no, co)
    assert worst <= ATOL
    # 64 tokens: the greedy loops agree, including the re-prefill once the context is full
    ours, cache = og.generate_tokens_ort(o, prompt[0], 64, return_cache=True)
    assert torch.equal(ours, generate_tokens(m, prompt[0], 64))
    assert ours.shape == (64,) and cache.length == 32
    assert torch.equal(og.generate_tokens_ort(o, ids(5), 10), generate_tokens(m, ids(5), 10))  # batch 2
    assert og.generate_tokens_ort(o, prompt, 0).shape == (1, 0)


def test_a_cache_passes_between_torch_and_ort(exported):
    m, path = exported["untied"]
    o = og.OrtGPT(path)
    x = ids(12)
    with torch.no_grad():
        ref = m(x)[:, 8:]
        _, torch_cache = m.step(x[:, :8])
        a, _ = o.step(x[:, 8:], torch_cache)       # torch prefill, ORT continues
        _, ort_cache = o.step(x[:, :8])
        b, _ = m.step(x[:, 8:], ort_cache)         # and the other way round
        c, _ = o.step(x[:, 8:], ort_cache.crop(8))
    for got in (a, b, c):
        assert float((got - ref).abs().max()) <= ATOL


def test_bpc_through_ort_matches_evaluate_bpc(exported):
    m, path = exported["tied"]
    text = ids(32 * 6 + 1, batch=1, seed=3)[0]
    ours, ref = og.evaluate_bpc_ort(og.OrtGPT(path), text, batch_size=4), evaluate_bpc(m, text)
    assert ours.chars == ref.chars == 32 * 6
    assert ours.bits_per_char == pytest.approx(ref.bits_per_char, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# int4 MatMulNBits


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_replaces_the_block_linears_and_keeps_the_head_float(quantized, method, symmetric):
    path = quantized("untied", method, symmetric)
    nodes = onnx.load(str(path)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2  # qkv, proj, fc, proj per layer
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert [n.name for n in nodes if n.op_type == "MatMul" and n.name == "lm_head"] == ["lm_head"]
    size = og.int4_size(path)
    # codes 4 bits + a float32 scale per 32 (+ a 4-bit zero point per 32 when asymmetric)
    assert size.bits_per_weight == pytest.approx(4 + 32 / 32 + (0 if symmetric else 4 / 32))
    assert size.ratio >= 6.2
    assert size.float_matmul_bytes == 17 * 64 * 4
    assert og.OrtGPT(path).int4 == {"method": method, "block_size": 32, "symmetric": symmetric,
                                    "include_lm_head": False, "accuracy_level": None}


@pytest.mark.parametrize("kind", KINDS)
def test_the_head_is_quantized_only_when_asked(quantized, kind):
    kept, head = quantized(kind), quantized(kind, include_lm_head=True)
    count = lambda p: sum(n.op_type == "MatMulNBits" for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert (count(kept), count(head)) == (8, 9)
    assert "lm_head" in og.dequantize_int4(head) and "lm_head" not in og.dequantize_int4(kept)


@pytest.mark.parametrize("kind,method,symmetric,include_lm_head", [
    ("untied", "rtn", True, False), ("untied", "rtn", False, False), ("untied", "gptq", True, False),
    ("untied", "gptq", False, False), ("tied", "rtn", True, False), ("tied-wide-vocab", "rtn", True, True)])
def test_int4_logits_are_the_torch_model_with_the_dequantized_weights(exported, quantized, kind, method, symmetric,
                                                                     include_lm_head):
    m, _ = exported[kind]
    path = quantized(kind, method, symmetric, include_lm_head)
    q = copy.deepcopy(m)
    linears = og._linears(q)
    weights = og.dequantize_int4(path)
    assert len(weights) == 8 + include_lm_head
    with torch.no_grad():
        for name, w in weights.items():
            if name == "lm_head" and m.config.tie_weights:
                q.lm_head.weight = torch.nn.Parameter(w)  # untie: the embedding stays float in the graph
            else:
                linears[name].weight.copy_(w)
        x = ids(20, m.config.vocab_size)
        ours, ref, fp32 = og.OrtGPT(path)(x), q(x), m(x)
    assert float((ours - ref).abs().max()) <= ATOL
    assert float((ours - fp32).abs().max()) > 10 * ATOL  # and int4 really changed the model


def test_ort_asymmetric_rtn_is_workbench_asymmetric_rtn(exported, quantized):
    """Same min-max rule (zero point from the range widened to 0) and round half to even: identical weights,
    so the ORT int4 model is workbench's int4 g32 asymmetric model to float32 rounding."""
    m, _ = exported["untied"]
    spec = WeightQuant(4, 32, symmetric=False)
    path = quantized("untied", "rtn", False)
    weights = og.dequantize_int4(path)
    for name, lin in og._linears(m).items():
        if name != "lm_head":
            assert torch.equal(weights[name], rtn(lin.weight, spec)[0])
    qm, _ = quantize_weights(m, spec)
    x = ids(20)
    with torch.no_grad():
        assert float((og.OrtGPT(path)(x) - qm(x)).abs().max()) <= ATOL


def test_ort_symmetric_rtn_is_sixteen_levels_around_the_zero_point_8(exported, quantized):
    """ORT's "symmetric": unsigned codes 0..15, zero point 8, S = 2 max|w| / 15 (computed in float64, stored
    as float32), so +max|w| lands on 7.5 and rounds (half to even) to 8 -> clipped to 15, i.e. 7 S. workbench:
    S = max|w| / 7, codes -7..7 in use."""
    m, _ = exported["untied"]
    weights = og.dequantize_int4(quantized("untied", "rtn", True))
    for name, lin in og._linears(m).items():
        if name == "lm_head":
            continue
        w = lin.weight.detach().double().view(lin.weight.shape[0], -1, 32)
        scale = 2 * w.abs().amax(-1, keepdim=True) / 15
        codes = torch.clamp(torch.round(w / scale) + 8, 0, 15)
        expect = ((codes - 8).float() * scale.float()).view_as(lin.weight)
        assert torch.equal(weights[name], expect)
        assert not torch.equal(weights[name], rtn(lin.weight, WeightQuant(4, 32))[0])


def test_int4_bpc_stays_near_fp32(exported, quantized):
    """On a random model the int4 error moves the bpc by far less than 0.05 bits (measured ~1e-3)."""
    m, path = exported["tied"]
    text = ids(32 * 6 + 1, batch=1, seed=3)[0]
    fp32 = og.evaluate_bpc_ort(og.OrtGPT(path), text).bits_per_char
    int4 = og.evaluate_bpc_ort(og.OrtGPT(quantized("tied", "rtn", False)), text).bits_per_char
    assert abs(int4 - fp32) < 0.05
    qm, _ = quantize_weights(m, WeightQuant(4, 32, symmetric=False))
    assert int4 == pytest.approx(evaluate_bpc(qm, text).bits_per_char, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# speed helpers (shape only: no timing asserts)


def test_decode_speed_and_a_one_width_sweep(exported, quantized):
    m, path = exported["untied"]
    speed = og.decode_speed(m, ids(4, batch=1)[0], 4, fp32=path, int4=quantized("untied"), repeats=1)
    assert set(speed) == {"torch_eager", "ort_fp32", "ort_int4"} and all(v > 0 for v in speed.values())
    rows = og.width_sweep((32,), n_layer=1, block_size=16, vocab_size=11, prompt_len=2, new_tokens=2, repeats=1)
    assert len(rows) == 1
    row = rows[0]
    assert row["params"] == 12 * 32 * 32 + 11 * 32
    assert row["fp32_bytes_per_step"] == 4 * row["params"]
    assert row["int4_bytes_per_step"] == 12 * 32 * 32 * 5 // 8 + 11 * 32 * 4  # 5 bits a weight + the float head
    assert all(row[k] > 0 for k in ("torch_eager", "ort_fp32", "ort_int4"))


def test_cpu_caches_are_positive_byte_counts():
    caches = og.cpu_caches()
    assert all(isinstance(v, int) and v > 0 for v in caches.values())
    assert set(caches) <= {"L1d", "L2", "L3", "L4"}


# ---------------------------------------------------------------------------------------------------------------
# bad input


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_prompt_longer_than_the_context(exported):
    m, path = exported["untied"]
    o = og.OrtGPT(path)
    with pytest.raises(WorkbenchError) as e:
        og.generate_tokens_ort(o, ids(33, batch=1)[0], 4)
    assert "context length is 32" in one_line(e)
    _, cache = o.step(ids(30))
    with pytest.raises(WorkbenchError) as e:
        o.step(ids(3), cache)
    assert "exceed the context length 32" in one_line(e)


def test_a_past_of_the_wrong_shape_or_layer_count(exported):
    m, path = exported["untied"]
    o = og.OrtGPT(path)
    _, cache = o.step(ids(4))
    with pytest.raises(WorkbenchError) as e:
        o.step(ids(1), KVCache(cache.layers[:1]))
    assert "1 layers but the model has 2" in one_line(e)
    k, v = cache.layers[0]
    for bad in (k[:, :1], k[:1], k[..., :16], k.double(), k[0], np.zeros(3)):  # heads, batch, head_dim, dtype, rank
        with pytest.raises(WorkbenchError) as e:
            o.step(ids(1), KVCache(((bad, v), cache.layers[1])))
        assert "(batch, heads, past_len, head_dim)" in one_line(e)
    with pytest.raises(WorkbenchError) as e:
        o.step(ids(1), [np.zeros(3)])
    assert "KVCache" in one_line(e)
    with pytest.raises(WorkbenchError):
        o.step(torch.zeros(1, 2))  # float ids
    with pytest.raises(WorkbenchError) as e:
        o.step(torch.full((1, 2), 17))
    assert "[0, 17)" in one_line(e)
    _, grad_cache = m.step(ids(4))  # outside no_grad: tensors that require grad are fine too
    assert o.step(ids(1), grad_cache)[1].length == 5


def test_a_model_path_that_does_not_exist_or_is_not_a_gpt(tmp_path):
    with pytest.raises(WorkbenchError) as e:
        og.OrtGPT(tmp_path / "missing.onnx")
    assert "does not exist" in one_line(e)
    mlp = wonnx.export(torch.nn.Linear(4, 3), tmp_path / "mlp.onnx", input_shape=(4,))
    with pytest.raises(WorkbenchError) as e:
        og.OrtGPT(mlp)
    assert "export_gpt" in one_line(e)
    with pytest.raises(WorkbenchError) as e:
        og.quantize_int4(mlp, tmp_path / "q.onnx")
    assert "export_gpt" in one_line(e)
    with pytest.raises(WorkbenchError) as e:
        og.quantize_int4(tmp_path / "missing.onnx", tmp_path / "q.onnx")
    assert "does not exist" in one_line(e)


def test_bad_quantization_settings(exported, tmp_path):
    _, path = exported["untied"]
    for kwargs, words in (({"method": "awq"}, "known: rtn, gptq"), ({"method": "gptq"}, "calibration set"),
                          ({"block_size": 24}, "power of two"),
                          ({"method": "gptq", "calib": torch.zeros(2, 40, dtype=torch.long)}, "length <= 32")):
        with pytest.raises(WorkbenchError) as e:
            og.quantize_int4(path, tmp_path / "q.onnx", **kwargs)
        assert words in one_line(e)
    with pytest.raises(WorkbenchError) as e:  # ORT's zero-point packing needs an even number of blocks per column
        og.quantize_int4(path, tmp_path / "q.onnx", symmetric=False, block_size=64)
    assert "even number of blocks" in one_line(e)
    with pytest.raises(WorkbenchError):
        og.int4_size(path)  # a float model has no MatMulNBits
    assert not math.isnan(og.int4_size(og.quantize_int4(path, tmp_path / "q.onnx")).ratio)

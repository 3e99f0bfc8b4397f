"""The language-model pipeline: Recipe(model="gpt") -> run -> LMResult, its checkpoints, its CLI and its bad inputs.

A tiny GPT (one layer, 32 wide, context 16, 20 steps; about a second) in a temporary cache stands in
for the book's model; each compressed figure is checked against the library function it comes from
or a closed form.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from workbench import llm, presets
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.recipe import LMResult, Recipe, run

TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, steps=20, batch_size=8, warmup_steps=2)
TINY_FLAGS = [a for k, v in TINY.items() for a in ("--option", f"{k}={v}")]


def gpt(**kw) -> Recipe:
    return Recipe(model="gpt", dataset="pydoc", model_options=TINY, **kw)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lm-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch):
    """One cache for the module (the tiny model trains once); tests about what is written use their own."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(shared_cache))
    monkeypatch.setenv("WORKBENCH_PROGRESS", "0")
    return shared_cache


@pytest.fixture(scope="module")
def corpus():
    return llm.load_corpus()


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_dense_run_is_the_trained_model_and_is_cached(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "own"))
    res = run(gpt())
    assert isinstance(res, LMResult) and not res.cached and res.steps == {} and res.delta_bpc == 0.0
    assert res.corpus["sha256"] == corpus.sha256 and res.corpus["python_version"]
    trained = llm.pretrained(llm.TrainConfig(**TINY))  # the same cache entry: no second training
    assert res.val_bpc == llm.evaluate_bpc(trained.model, corpus.ids("val")).bits_per_char
    assert res.bits_per_weight == 32.0 and res.weight_bytes == res.fp32_weight_bytes == 4 * res.linear_weights
    assert res.samples["prompt"] and len(res.samples["sampled"]) == len(res.samples["greedy"]) > 0
    again = run(gpt())
    assert again.cached and again.val_bpc == res.val_bpc and again.samples == res.samples


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize(("bits", "group"), [(4, 16), (3, 0)])
def test_weight_only_quantization_matches_the_library(corpus, method, bits, group):
    res = run(gpt(weight_bits=bits, group_size=group, quant_method=method))
    rec = res.steps["quantize"]
    assert (rec.method, rec.weight_bits, rec.group_size, rec.act_bits) == (method, bits, group, 0)
    # bits per weight from the packed bytes equals the closed form bits + 32/g (per channel: g = input width)
    model, _ = run(gpt()).load_model()
    layers = llm.block_linears(model)
    expect = sum(m.weight.numel() * llm.closed_form_bits_per_weight(bits, group or m.in_features, symmetric=True)
                 for m in layers.values()) / sum(m.weight.numel() for m in layers.values())
    assert res.bits_per_weight == pytest.approx(expect, rel=1e-12)
    # the stored (packed) model reloads to the measured bits per character
    qmodel, _ = res.load_model()
    assert llm.evaluate_bpc(qmodel, corpus.ids("val")).bits_per_char == pytest.approx(res.val_bpc, abs=1e-6)
    if method == "rtn":  # the pipeline's RTN is the library's RTN
        direct, _ = llm.quantize_weights(model, llm.WeightQuant(bits, group or None))
        assert res.val_bpc == pytest.approx(llm.evaluate_bpc(direct, corpus.ids("val")).bits_per_char, abs=1e-6)
    assert res.dense_val_bpc == run(gpt()).val_bpc and math.isfinite(res.delta_bpc)


def test_packed_checkpoint_is_smaller_on_disk():
    dense, q4 = run(gpt()), run(gpt(weight_bits=4, group_size=32))
    linear_fp32 = dense.fp32_weight_bytes
    saved = os.path.getsize(dense.checkpoint_path) - os.path.getsize(q4.checkpoint_path)
    # the block Linears went from 4 bytes per weight to 5/8 of a byte: the file shrank by about the difference
    assert saved == pytest.approx(linear_fp32 - q4.weight_bytes, rel=0.05)


def test_w8a8_with_smoothquant_and_reload(corpus):
    res = run(gpt(weight_bits=8, act_bits=8, quant_method="smoothquant"))
    rec = res.steps["quantize"]
    assert rec.act_bits == 8 and rec.alphas and all(0 <= a <= 1 for a in rec.alphas.values())
    model, _ = res.load_model()
    assert any(type(m).__name__ == "FakeQuantLayer" for m in model.modules())  # activations quantized again
    assert llm.evaluate_bpc(model, corpus.ids("val")).bits_per_char == pytest.approx(res.val_bpc, abs=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_2_of_4_and_50_percent(method):
    res = run(gpt(prune_amount=0.5, prune_kind="2:4", prune_method=method))
    model, _ = res.load_model()
    for lin in llm.block_linears(model).values():
        nonzero = (lin.weight.reshape(lin.out_features, -1, 4) != 0).sum(-1)
        assert int(nonzero.max()) <= 2
    assert res.sparsity >= 0.5 and res.steps["prune"].kind == "2:4"
    half = run(gpt(prune_amount=0.5, prune_method=method))
    assert half.sparsity == pytest.approx(0.5, abs=1e-3) and half.steps["prune"].scope


def test_prune_then_quantize_in_table_order():
    res = run(gpt(prune_amount=0.5, prune_method="wanda", weight_bits=4, group_size=16))
    assert list(res.steps) == ["prune", "quantize"] and res.sparsity == pytest.approx(0.5, abs=1e-3)
    model, _ = res.load_model()  # symmetric RTN keeps a zero weight at zero: the sparsity survives packing
    zeros = sum(int((m.weight == 0).sum()) for m in llm.block_linears(model).values())
    assert zeros >= 0.5 * res.linear_weights


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(weight_bits=4, group_size=24), "does not divide the GPT's layer input width"),
        (dict(weight_bits=17), "1..16"),
        (dict(weight_bits=4, group_size=-1), "group_size must be >= 0"),
        (dict(lr=0.1), "does not apply to the GPT"),
        (dict(epochs=3), "does not apply to the GPT"),
        (dict(dataset="digits"), "text corpus"),
        (dict(quant_method="gptq"), "set weight_bits too"),
        (dict(weight_bits=4, act_bits=8, quant_method="gptq"), "weight-only"),
        (dict(weight_bits=8, quant_method="smoothquant"), "set act_bits"),
        (dict(prune_amount=0.3, prune_kind="2:4"), "prune_amount=0.5"),
        (dict(prune_amount=0.5, prune_kind="structured"), "not by channels"),
        (dict(prune_amount=0.5, prune_method="obs"), "prune_method must be one of"),
        (dict(model_options={"width": 3}), "unknown GPT option"),
    ],
)
def test_bad_recipes_fail_at_construction_in_one_line(settings, message):
    kw = {"model_options": TINY, **settings}
    kw.setdefault("dataset", "pydoc")
    with pytest.raises(WorkbenchError, match=message) as exc:
        Recipe(model="gpt", **kw)
    assert "\n" not in str(exc.value)


def test_classifiers_refuse_the_gpt_only_settings():
    with pytest.raises(WorkbenchError, match="for the GPT"):
        Recipe(model="mlp", weight_bits=4, quant_method="gptq")
    with pytest.raises(WorkbenchError, match="GPT's"):
        Recipe(model="mlp", prune_amount=0.5, prune_method="wanda")
    with pytest.raises(WorkbenchError, match=r"pydoc \(text\) for model='gpt'"):
        Recipe(model="mlp", dataset="pydoc")


def test_a_corpus_too_short_for_the_context_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    recipe = Recipe(model="gpt", dataset="pydoc", model_options={**TINY, "block_size": 100_000})
    with pytest.raises(WorkbenchError, match="too short for context length"):
        run(recipe)
    assert _files(tmp_path / "cache") == []


def test_run_refuses_data_or_model_for_the_gpt():
    with pytest.raises(WorkbenchError, match="no data= or model="):
        run(gpt(), model=torch.nn.Linear(2, 2))


def test_the_book_grid_is_valid_for_the_default_model():
    for b in presets.LLM_BITS:
        for g in presets.LLM_GROUPS:
            for m in presets.LLM_QUANT_METHODS:
                presets.llm_quant(b, g, m)  # every point of the explorer is a valid recipe
    for k in presets.LLM_PRUNE_KINDS:
        for m in presets.LLM_PRUNE_METHODS:
            presets.llm_prune(m, k)


# ---- the command line ------------------------------------------------------------------------------

def test_cli_train_compress_info_generate(tmp_path, capsys):
    dense, q = tmp_path / "gpt.pt", tmp_path / "gpt-int4.pt"
    assert main(["train", "--model", "gpt", "--dataset", "pydoc", *TINY_FLAGS, "--out", str(dense)]) == 0
    assert "bits/char" in capsys.readouterr().out and dense.is_file()
    assert main(["compress", "--model", "gpt", "--dataset", "pydoc", *TINY_FLAGS, "--bits", "4", "--group-size", "16",
                 "--quant-method", "gptq", "--out", str(q)]) == 0
    out = capsys.readouterr().out
    assert "GPTQ 4-bit weights groups of 16" in out and "6 bits per weight" in out
    assert os.path.getsize(q) < os.path.getsize(dense)
    assert main(["info", str(q)]) == 0
    info = capsys.readouterr().out
    res = run(gpt(weight_bits=4, group_size=16, quant_method="gptq"))
    assert f"{res.val_bpc:.4f} bits/char" in info and "gptq 4-bit weights, groups of 16" in info
    assert main(["generate", str(q), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0.8",
                 "--seed", "3"]) == 0
    text = capsys.readouterr().out
    model, tok = res.load_model()
    assert text == "def " + llm.generate(model, tok, "def ", max_new_tokens=12, temperature=0.8, seed=3) + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "{ckpt}", "--prompt", "snow \u2603"], "not in the 103-character vocabulary"),
        (["generate", "{ckpt}", "--prompt", ""], "prompt is empty"),
        (["generate", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "{ckpt}", "--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
        (["generate", "{ckpt}", "--prompt", "x", "--max-new-tokens", "-3"], "max_new_tokens"),
        (["generate", "notes.txt", "--prompt", "x"], "not a workbench checkpoint"),
        (["export", "{ckpt}", "--out", "x.onnx"], "is a GPT checkpoint"),
        (["compress", "--model", "gpt", "--dataset", "pydoc", "--bits", "4", "--group-size", "48", "--out", "q.pt"],
         "does not divide"),
        (["compress", "--model", "gpt", "--dataset", "pydoc", "--bits", "4", "--onnx", "q.onnx", "--out", "q.pt"],
         "--onnx is not available for the GPT"),
        (["compress", "--model", "gpt", "--dataset", "digits", "--bits", "4", "--out", "q.pt"], "text corpus"),
    ],
)
def test_cli_bad_inputs_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, cache, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    ckpt = tmp_path / "g.pt"
    assert main(["train", "--model", "gpt", "--dataset", "pydoc", *TINY_FLAGS, "--out", str(ckpt)]) == 0
    capsys.readouterr()
    before, cached = _files(tmp_path), _files(cache)
    assert main([a.format(ckpt=ckpt) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert _files(tmp_path) == before and _files(cache) == cached


def test_damaged_gpt_checkpoint_is_one_line(tmp_path):
    ckpt = run(gpt()).checkpoint_path
    payload = torch.load(ckpt, weights_only=True)
    del payload["state_dict"]["wte.weight"]
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(WorkbenchError, match="damaged GPT checkpoint"):
        llm.checkpoint.load(bad)

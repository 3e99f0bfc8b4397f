"""workbench.llm.gpt and trainer: causality, tying, generation, bits per character, training and its cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.llm import GPT, GPTConfig, TrainConfig, evaluate_bpc, generate, load_corpus, pretrained, train
from workbench.llm.corpus import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TINY = TrainConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, steps=60, batch_size=16, warmup_steps=5, lr=1e-2)


def tiny_model(vocab=12, tie=True, seed=0):
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=tie), seed=seed)


def test_causal_and_shapes():
    m = tiny_model().eval()
    x = torch.randint(0, 12, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 12
    a, b = m(x), m(y)
    assert a.shape == (2, 10, 12)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_weight_tying_and_seeded_init():
    m = tiny_model(tie=True)
    assert m.lm_head.weight is m.wte.weight
    assert tiny_model(tie=False).lm_head.weight is not tiny_model(tie=False).wte.weight
    torch.testing.assert_close(tiny_model(seed=3).blocks[0].mlp.fc.weight, tiny_model(seed=3).blocks[0].mlp.fc.weight)
    with pytest.raises(WorkbenchError, match="context length"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(WorkbenchError, match="divisible"):
        GPTConfig(vocab_size=5, n_embd=30, n_head=4)


def test_generation_greedy_sampled_and_bad_prompt():
    tok = CharTokenizer.from_text("abcdefghijkl")
    m = tiny_model()
    g1 = generate(m, tok, "abc", max_new_tokens=30)
    assert g1 == generate(m, tok, "abc", max_new_tokens=30) and len(g1) == 30  # longer than the context: cropped
    s1 = generate(m, tok, "abc", max_new_tokens=20, temperature=1.0, seed=1)
    assert s1 == generate(m, tok, "abc", max_new_tokens=20, temperature=1.0, seed=1)
    assert s1 != generate(m, tok, "abc", max_new_tokens=20, temperature=1.0, seed=2)
    with pytest.raises(WorkbenchError, match="'z'") as exc:
        generate(m, tok, "abz")
    assert "\n" not in str(exc.value)


def test_bpc_of_a_uniform_model_is_log2_vocab():
    m = tiny_model()
    with torch.no_grad():
        m.lm_head.weight.zero_()  # tied: also zeroes the embedding; logits are all 0
    r = evaluate_bpc(m, torch.randint(0, 12, (100,)))
    assert r.bits_per_char == pytest.approx(math.log2(12), rel=1e-6)
    assert r.perplexity == pytest.approx(12, rel=1e-5)
    assert r.chars == 16 * 6  # non-overlapping windows: (100 - 1) // 16 of them


def test_training_learns_and_is_seeded():
    corpus = load_corpus(TEXT)
    a = train(TINY, corpus, progress=False)
    b = train(TINY, corpus, progress=False)
    uniform = math.log2(corpus.tokenizer.vocab_size)
    assert a.meta["val_bpc"] < 0.6 * uniform  # a repeated sentence is easy
    assert a.meta["sha256"] == corpus.sha256 and a.meta["python_version"]
    # same seed, same machine: same numbers (bit-identical is not asserted across CPUs)
    assert a.meta["val_bpc"] == pytest.approx(b.meta["val_bpc"], rel=1e-5)


def test_the_model_cache_lives_in_the_recipe_cache_dir(monkeypatch, tmp_path):
    from workbench.recipe import cache_dir

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    trained = pretrained(TINY, corpus=load_corpus(TEXT), progress=False)
    assert trained.path.parent == cache_dir() / "llm"


def test_pretrained_caches_atomically_and_bad_input_writes_nothing(tmp_path):
    corpus = load_corpus(TEXT)
    first = pretrained(TINY, corpus=corpus, cache=tmp_path, progress=False)
    entries = [p for p in (tmp_path / "llm").iterdir()]
    assert [p.name for p in entries] == [first.meta["key"]]  # no temp folder left behind
    assert json.loads((entries[0] / "meta.json").read_text())["val_bpc"] == first.meta["val_bpc"]
    again = pretrained(TINY, corpus=corpus, cache=tmp_path, progress=False)
    assert again.path == first.path
    for p, q in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)
    other = tmp_path / "other"
    with pytest.raises(WorkbenchError, match="too short") as exc:
        pretrained(TrainConfig(block_size=512), corpus=corpus, cache=other, progress=False)
    assert "\n" not in str(exc.value) and not other.exists()

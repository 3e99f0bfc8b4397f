"""workbench.llm.decode and GPT.step: the KV cache against the full forward pass, greedy tokens with and
without the cache, the cache's size in bytes, speculative decoding against the target's greedy output and
the target's sampling distribution, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.llm import GPT, GPTConfig, TrainConfig, generate, load_corpus, train
from workbench.llm import decode
from workbench.llm.corpus import CharTokenizer
from workbench.llm.decode import generate_tokens, kv_cache_bytes, speculative_generate, verify

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def model(vocab=12, block=32, layers=2, embd=32, seed=0, scale=30.0):
    """A random GPT with an untied head scaled up: logits of a few units, so the argmax has clear margins
    (a std-0.02 head gives near-uniform logits where float rounding could decide ties)."""
    m = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=2, n_embd=embd,
                      tie_weights=False), seed=seed).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m


def tol(logits: torch.Tensor) -> float:
    """Float32 agreement of two computation orders of the same logits. u = 2**-24; a dot product of
    length n errs by about sqrt(n) u times its scale in practice (n u at worst); the logits pass through
    about a dozen matmuls of length <= 128 (and GELU, softmax, LayerNorm, a few u each): 1e-5 (~170 u)
    times the logit scale is above that and far below the argmax margins the greedy tests require (100x)."""
    return 1e-5 * (1.0 + float(logits.abs().max()))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only fight over a shared machine's cores
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    cfg = TrainConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, steps=60, batch_size=16, warmup_steps=5, lr=1e-2)
    return train(cfg, load_corpus(TEXT), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("chunks", [(16,), (1,) * 16, (5, 1, 1, 4, 5), (3, 13)])
def test_step_with_cache_matches_the_full_forward(chunks):
    m = model()
    x = torch.randint(0, 12, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(m.step(x)[0], ref)  # no cache: the same operations as forward
        got, cache, at = [], None, 0
        for c in chunks:  # multi-token chunks after a cache need the offset causal mask
            logits, cache = m.step(x[:, at:at + c], cache)
            got.append(logits)
            at += c
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=0, atol=tol(ref))


def test_a_chunk_after_the_cache_is_causal_within_itself():
    m = model()
    x = torch.randint(0, 12, (1, 12), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 1) % 12
    with torch.no_grad():
        _, cache = m.step(x[:, :6])
        a, b = m.step(x[:, 6:], cache)[0], m.step(y[:, 6:], cache)[0]
    assert torch.equal(a[:, :3], b[:, :3])  # positions 6..8 must not see 9..11
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_cache_bytes_match_the_tensors_and_the_closed_form():
    m = model(block=32)
    prompt = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(0))
    new, cache = generate_tokens(m, prompt, 20, use_cache=True, return_cache=True)
    assert new.shape == (3, 20)
    cfg = m.config
    # the last token is returned, not yet fed: the cache holds prompt + 19 positions
    assert cache.length == 24 and len(cache.layers) == cfg.n_layer
    for k, v in cache.layers:
        assert k.shape == v.shape == (3, cfg.n_head, 24, cfg.n_embd // cfg.n_head)
    assert cache.nbytes == kv_cache_bytes(cfg, tokens=24, batch=3) == 2 * 2 * 32 * 24 * 3 * 4
    assert kv_cache_bytes(GPTConfig(vocab_size=100), tokens=128, bytes_per=2) == 2 * 4 * 128 * 128 * 2


def _greedy_margins(m: GPT, prompt: torch.Tensor, new: torch.Tensor) -> tuple[float, float]:
    """The smallest top-1/top-2 logit gap along the no-cache greedy path, and the float32 tolerance."""
    seq, block = torch.cat([prompt, new]).unsqueeze(0), m.config.block_size
    gaps, tols = [], []
    with torch.no_grad():
        for n in range(len(prompt), seq.shape[1]):
            logits = m(seq[:, max(0, n - block):n])[0, -1]
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            tols.append(tol(logits))
    return min(gaps), max(tols)


@pytest.mark.parametrize("block", [16, 128])  # 16: the sequence outgrows the context and the cache is rebuilt
def test_greedy_tokens_are_identical_with_and_without_the_cache(block):
    m = model(block=block)
    prompt = torch.tensor([1, 2, 3])
    plain = generate_tokens(m, prompt, 100, use_cache=False)
    cached = generate_tokens(m, prompt, 100, use_cache=True)
    gap, eps = _greedy_margins(m, prompt, plain)
    assert gap > 100 * eps  # no near-tie that rounding could flip: equality below is a real check
    assert torch.equal(plain, cached) and len(plain) == 100
    tok = CharTokenizer("abcdefghijkl")  # the no-cache path is workbench.llm.generate's loop
    assert tok.decode(plain) == generate(m, tok, tok.decode(prompt), max_new_tokens=100)


def test_greedy_cache_on_a_trained_model(trained):
    m, tok = trained.model, trained.tokenizer
    prompt = tok.encode("the quick")
    plain = generate_tokens(m, prompt, 60, use_cache=False)  # 9 + 60 > 32: rebuilt past the context
    gap, eps = _greedy_margins(m, prompt, plain)
    assert gap > 100 * eps
    assert torch.equal(plain, generate_tokens(m, prompt, 60, use_cache=True))
    assert "fox" in tok.decode(plain)


def test_sampling_is_seeded_and_the_same_with_and_without_the_cache():
    m = model(scale=3.0)
    prompt = torch.tensor([[1, 2], [3, 4]])
    a = generate_tokens(m, prompt, 40, use_cache=True, temperature=1.0, top_k=5, seed=7)
    assert torch.equal(a, generate_tokens(m, prompt, 40, use_cache=True, temperature=1.0, top_k=5, seed=7))
    assert not torch.equal(a, generate_tokens(m, prompt, 40, use_cache=True, temperature=1.0, top_k=5, seed=8))
    # same draws in the same order; logits differ by rounding only, which moves a draw only if its
    # uniform lands within ~1e-6 of a boundary of the cumulative distribution
    assert torch.equal(a, generate_tokens(m, prompt, 40, use_cache=False, temperature=1.0, top_k=5, seed=7))
    state = torch.random.get_rng_state()
    generate_tokens(m, prompt, 5, use_cache=True, temperature=1.0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert generate_tokens(m, prompt[0], 0, use_cache=True).shape == (0,)


def test_tokens_per_second_runs():
    assert decode.tokens_per_second(model(), torch.tensor([1, 2]), 8, use_cache=True, repeats=1) > 0


# ---------------------------------------------------------------------------------------------------------------
# Speculative decoding


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("same", [False, True])
def test_speculative_greedy_is_the_targets_greedy_output(k, same):
    target = model(block=64, seed=0)
    draft = target if same else model(block=64, layers=1, seed=1)
    prompt = torch.tensor([1, 2, 3])
    ref = generate_tokens(target, prompt, 80, use_cache=False)  # 83 > 64: the last tokens past the context
    gap, eps = _greedy_margins(target, prompt, ref)
    assert gap > 100 * eps
    r = speculative_generate(target, draft, prompt, 80, k=k)
    assert torch.equal(r.tokens, ref)
    assert r.draft_calls == r.proposed and len(r.tokens) == r.accepted + r.target_calls  # one target token per call
    if same:
        assert r.accepted == r.proposed > 0 and r.rejected == 0 and r.target_calls < 80
    else:
        assert r.accepted < r.proposed and r.rejected > 0  # rejections happened and were corrected


def test_speculative_greedy_with_a_trained_target_and_an_untrained_draft(trained):
    m, tok = trained.model, trained.tokenizer
    draft = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=5)
    prompt = tok.encode("the quick")
    ref = generate_tokens(m, prompt, 40, use_cache=True)
    r = speculative_generate(m, draft, prompt, 40, k=4)
    assert torch.equal(r.tokens, ref) and r.rejected > 0
    r_self = speculative_generate(m, m, prompt, 20, k=4)
    assert torch.equal(r_self.tokens, ref[:20]) and r_self.accepted == r_self.proposed


def _tv_bound(p: torch.Tensor, n: int, delta: float) -> float:
    """A total-variation distance the empirical distribution of n draws from p exceeds with probability
    < delta. E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) (Jensen on each |p_hat_i - p_i|), and TV changes by
    at most 1/n when one draw changes, so McDiarmid gives P(TV >= E[TV] + t) <= exp(-2 n t^2)."""
    mean = 0.5 * float((p * (1 - p) / n).sqrt().sum())
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def _exact_joint(target: GPT, prompt: torch.Tensor, length: int, temperature: float) -> torch.Tensor:
    """P(x_1 .. x_length) of the target's own sampling, (V,) * length, by running every prefix at once."""
    v = target.config.vocab_size
    tails = torch.cartesian_prod(*[torch.arange(v)] * (length - 1)).view(-1, length - 1)
    seqs = torch.cat([prompt.expand(len(tails), -1), tails], 1)
    with torch.no_grad():
        cond = (target(seqs)[:, len(prompt) - 1:] / temperature).softmax(-1)  # (V^(L-1), L, V)
    joint = torch.ones(len(tails))
    for j in range(length - 1):
        joint = joint * cond[torch.arange(len(tails)), j, tails[:, j]]
    # each tail's probability of its first L-1 tokens, times the last token's conditional
    return (joint[:, None] * cond[:, -1]).view(*[v] * length)


def _draw(target, draft, prompt, n, length, temperature):
    """n runs with seeds 0 .. n-1: the tokens (n, length) and the summed (proposed, accepted)."""
    runs = [speculative_generate(target, draft, prompt, length, k=3, temperature=temperature, seed=s)
            for s in range(n)]
    return torch.stack([r.tokens for r in runs]), sum(r.proposed for r in runs), sum(r.accepted for r in runs)


def _checks(samples: torch.Tensor, joint: torch.Tensor, delta: float) -> list[tuple[float, float]]:
    """(TV, bound) for each position's marginal and for the joint of the first two tokens."""
    v, length = joint.shape[0], joint.dim()
    out = []
    for j in range(length):
        p = joint.sum(dim=[d for d in range(length) if d != j])
        out.append((_tv(torch.bincount(samples[:, j], minlength=v).float(), p), _tv_bound(p, len(samples), delta)))
    p12 = joint.sum(dim=list(range(2, length))).flatten()
    c12 = torch.bincount(samples[:, 0] * v + samples[:, 1], minlength=v * v).float()
    out.append((_tv(c12, p12), _tv_bound(p12, len(samples), delta)))
    return out


def _always_accept(p, q, drafted, *, generator):
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


def _resample_from_p(p, q, drafted, *, generator):  # forgets to subtract q on rejection
    for i in range(len(drafted)):
        x = int(drafted[i])
        if torch.rand((), generator=generator) * q[i, x] >= p[i, x]:
            return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


N_DRAWS, LENGTH, DELTA = 3000, 3, 1e-6 / 4  # 4 checks, union bound: false alarm < 1e-6 in all


@pytest.fixture(scope="module")
def pair():
    """Vocabulary 8, a target and a draft that often disagree (TV of their first distributions ~0.5)."""
    target = model(vocab=8, block=16, layers=1, embd=16, seed=0, scale=15.0)
    draft = model(vocab=8, block=16, layers=1, embd=16, seed=1, scale=15.0)
    prompt = torch.tensor([1, 2])
    return target, draft, prompt, _exact_joint(target, prompt, LENGTH, 1.0)


def test_speculative_sampling_has_the_targets_distribution(pair):
    target, draft, prompt, joint = pair
    samples, proposed, accepted = _draw(target, draft, prompt, N_DRAWS, LENGTH, 1.0)
    assert 0.2 * proposed < accepted < 0.8 * proposed  # both branches (accept, reject + resample) well used
    for tv, bound in _checks(samples, joint, DELTA):
        assert tv < bound


@pytest.mark.parametrize("wrong", [_always_accept, _resample_from_p])
def test_the_distribution_check_catches_a_wrong_acceptance_rule(pair, wrong, monkeypatch):
    target, draft, prompt, joint = pair
    monkeypatch.setattr(decode, "verify", wrong)
    samples = _draw(target, draft, prompt, N_DRAWS, LENGTH, 1.0)[0]
    assert any(tv > bound for tv, bound in _checks(samples, joint, DELTA))


def test_verify_keeps_the_target_marginal():
    """The accept/reject step alone, on fixed p and q: position 1 is distributed as p[0] whatever q is
    (min(p, q) accepted + max(0, p - q) resampled), and the bonus after full acceptance as p[k]."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    n, first, bonus = 20000, torch.zeros(4), torch.zeros(4)
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        m, tok = verify(p, q, d, generator=g)
        first[int(d) if m == 1 else tok] += 1
        if m == 1:
            bonus[tok] += 1
    assert _tv(first, p[0]) < _tv_bound(p[0], n, 1e-7)
    assert _tv(bonus, p[1]) < _tv_bound(p[1], int(bonus.sum()), 1e-7)
    # accepted with probability sum min(p, q) = 0.1 + 0.1 + 0.2 = 0.4
    assert abs(bonus.sum() / n - 0.4) < math.sqrt(math.log(2 / 1e-7) / (2 * n))  # Hoeffding


def test_expected_tokens_per_call():
    assert decode.expected_tokens_per_call(1.0, 4) == 5 and decode.expected_tokens_per_call(0.0, 4) == 1
    assert decode.expected_tokens_per_call(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call, match", [
    (lambda m, d: generate_tokens(m, torch.tensor([1]), -1), "max_new_tokens"),
    (lambda m, d: generate_tokens(m, torch.tensor([1]), 2.5), "max_new_tokens"),
    (lambda m, d: generate_tokens(m, torch.zeros(33, dtype=torch.long), 1), "context length is 32"),
    (lambda m, d: generate_tokens(m, torch.zeros(0, dtype=torch.long), 1), "empty"),
    (lambda m, d: generate_tokens(m, torch.tensor([12]), 1), r"\[0, 12\)"),
    (lambda m, d: generate_tokens(m, torch.tensor([1]), 3, temperature=-0.5), "temperature"),
    (lambda m, d: generate_tokens(m, torch.tensor([1]), 3, temperature=float("nan")), "temperature"),
    (lambda m, d: generate_tokens(m, torch.tensor([1]), 3, temperature=1.0, top_k=0), "top_k"),
    (lambda m, d: speculative_generate(m, d, torch.tensor([1]), 3, k=0), "k"),
    (lambda m, d: speculative_generate(m, model(vocab=10), torch.tensor([1]), 3), "vocabulary"),
    (lambda m, d: speculative_generate(m, d, torch.tensor([[1], [2]]), 3), "one sequence"),
    (lambda m, d: speculative_generate(m, d, torch.tensor([1]), 3, temperature=-1.0), "temperature"),
    (lambda m, d: m.step(torch.zeros(1, 1, dtype=torch.long), m.step(torch.zeros(1, 32, dtype=torch.long))[1]),
     "exceed the context length 32"),
    (lambda m, d: m.step(torch.zeros(1, 1, dtype=torch.long), model(layers=1).step(torch.zeros(1, 2).long())[1]),
     "another model"),
])
def test_bad_input_is_one_clear_line(call, match):
    with pytest.raises(WorkbenchError, match=match) as exc:
        call(model(), model(seed=1))
    assert "\n" not in str(exc.value)

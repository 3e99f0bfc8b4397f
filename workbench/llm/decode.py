"""Large models, part 2: faster decoding of the small GPT: a KV cache (each token's keys and values kept,
so a new token costs one position instead of the whole context) and speculative decoding (a small draft
proposes k tokens, the target checks them in one forward pass and keeps its own output distribution).

Speculative sampling follows Leviathan et al. 2023 / Chen et al. 2023: draft token x ~ q is accepted with
probability min(1, p(x) / q(x)); on rejection the token is drawn from norm(max(0, p - q)); when all k are
accepted a bonus token is drawn from the target's next distribution. The emitted tokens are then
distributed exactly as the target's own samples (greedy: exactly the target's greedy output).

Example:
    >>> from workbench.llm import pretrained, decode
    >>> t = pretrained(); ids = t.tokenizer.encode("def ")
    >>> decode.tokens_per_second(t.model, ids, 256, use_cache=True)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import WorkbenchError
from .gpt import GPT, GPTConfig, KVCache

__all__ = ["generate_tokens", "kv_cache_bytes", "tokens_per_second", "speculative_generate", "SpeculativeResult",
           "verify", "expected_tokens_per_call"]


def kv_cache_bytes(config: GPTConfig, tokens: int, batch: int = 1, bytes_per: int = 4) -> int:
    """Bytes of a full KV cache: 2 (K and V) x layers x heads x head_dim x tokens x batch x bytes per value.

    Example:
        >>> kv_cache_bytes(GPTConfig(vocab_size=100, n_layer=4, n_embd=128), tokens=128)  # 2*4*128*128*4
        524288
    """
    return 2 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * tokens * batch * bytes_per


def _check_prompt(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.dtype != torch.long:
        raise WorkbenchError("prompt ids must be an int64 tensor of shape (T,) or (B, T), "
                             "e.g. tokenizer.encode(text)")
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    if ids.shape[1] < 1:
        raise WorkbenchError("the prompt is empty: give at least one token to continue")
    if ids.shape[1] > model.config.block_size:
        raise WorkbenchError(f"the prompt has {ids.shape[1]} tokens but the context length is "
                             f"{model.config.block_size}; keep its last {model.config.block_size} tokens")
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise WorkbenchError(f"prompt ids must be in [0, {model.config.vocab_size}), "
                             f"got {int(ids.min())}..{int(ids.max())}")
    return ids


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise WorkbenchError(f"max_new_tokens must be a non-negative integer (0 gives no tokens), "
                             f"got {max_new_tokens!r}")
    if not temperature >= 0:
        raise WorkbenchError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise WorkbenchError(f"top_k must be a positive integer or None, got {top_k!r}")


def _filter(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Logits / T with all but the top-k set to -inf (as workbench.llm.generate does)."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """The distribution a token is drawn from: one-hot at the argmax when greedy."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return _filter(logits, temperature, top_k).softmax(-1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next ids."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(_filter(logits, temperature, top_k).softmax(-1), 1, generator=gen)


class _Eval:
    """Eval mode for the duration of a `with`, then the models' own modes back."""

    def __init__(self, *models: GPT):
        self.models, self.modes = models, [m.training for m in models]

    def __enter__(self) -> None:
        for m, mode in zip(self.models, self.modes):
            if mode:  # (train() walks every submodule: skip it when there is nothing to change)
                m.eval()

    def __exit__(self, *exc) -> None:
        for m, mode in zip(self.models, self.modes):
            if mode:
                m.train()


@torch.no_grad()
def generate_tokens(model: GPT, ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
                    temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                    return_cache: bool = False) -> torch.Tensor | tuple[torch.Tensor, KVCache | None]:
    """Continue the prompt `ids` by `max_new_tokens` tokens, with or without a KV cache.

    Without the cache every token runs the model on the last ``block_size`` tokens (as
    :func:`workbench.llm.generate`). With it the prompt is run once (prefill) and then one position per
    token. Positions are learned and absolute, so a full cache cannot slide: when the sequence outgrows
    the context, the cache is rebuilt from the last ``block_size`` tokens (the same computation as without
    the cache, so both paths give the same tokens, and past that point the cache saves nothing).

    Args:
        model: the GPT.
        ids: prompt token ids, (T,) or (B, T) with 1 <= T <= block_size.
        max_new_tokens: how many tokens to add; 0 gives an empty result.
        use_cache: keep keys and values between steps.
        temperature: 0 is greedy (argmax); otherwise sample from softmax(logits / temperature).
        top_k: sample among the k most likely tokens only.
        seed: seeds the generator every sample is drawn from (the global RNG is untouched).
        return_cache: also return the final cache (None without a cache).

    Returns:
        The new tokens, (max_new_tokens,) or (B, max_new_tokens) like `ids`; with `return_cache`, a pair.

    Example:
        >>> new = generate_tokens(model, tok.encode("def "), 100, use_cache=True); tok.decode(new)
    """
    _check_sampling(max_new_tokens, temperature, top_k)
    squeeze = isinstance(ids, torch.Tensor) and ids.dim() == 1
    seq = _check_prompt(model, ids)
    block = model.config.block_size
    gen = torch.Generator().manual_seed(seed)
    out, cache = [], None
    with _Eval(model):
        if max_new_tokens and use_cache:
            logits, cache = model.step(seq)
        for i in range(max_new_tokens):
            if not use_cache:
                logits = model(seq[:, -block:])
            nxt = _pick(logits[:, -1], temperature, top_k, gen)
            out.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
            if use_cache and i + 1 < max_new_tokens:
                if cache.length < block:
                    logits, cache = model.step(nxt, cache)
                else:  # full: rebuild from the last block_size tokens (new positions for all of them)
                    logits, cache = model.step(seq[:, -block:])
    new = torch.cat(out, dim=1) if out else seq.new_zeros(seq.shape[0], 0)
    new = new[0] if squeeze else new
    return (new, cache) if return_cache else new


def tokens_per_second(model: GPT, ids: torch.Tensor, new_tokens: int, *, use_cache: bool, repeats: int = 3,
                      temperature: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median decoding speed (new tokens per second, prefill included) over `repeats` runs, after one
    untimed warm-up run.

    Args:
        clock: ``time.perf_counter`` (wall clock) or ``time.process_time`` (this process's CPU time: less
            disturbed by other programs on a shared machine, but it adds up all threads).

    Example:
        >>> tokens_per_second(t.model, t.tokenizer.encode("def "), 256, use_cache=True)
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise WorkbenchError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise WorkbenchError(f"new_tokens must be a positive integer, got {new_tokens!r}")

    def run() -> None:
        generate_tokens(model, ids, new_tokens, use_cache=use_cache, temperature=temperature)

    run()
    seconds = []
    for _ in range(repeats):
        t0 = clock()
        run()
        seconds.append(clock() - t0)
    return new_tokens / statistics.median(seconds)


# ---------------------------------------------------------------------------------------------------------------
# Speculative decoding


@dataclass(frozen=True)
class SpeculativeResult:
    """The new tokens and what it took: draft tokens proposed and accepted, rounds that ended in a
    rejection, forward calls of each model (each target call adds exactly one target token, so
    ``len(tokens) == accepted + target_calls``)."""

    tokens: torch.Tensor
    proposed: int
    accepted: int
    rejected: int
    target_calls: int
    draft_calls: int

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed draft tokens kept (those after a rejection count as not kept)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def alpha(self) -> float:
        """The per-token acceptance probability, accepted / (accepted + rejected): the quantity in
        :func:`expected_tokens_per_call` (drafts after a rejection were never tested)."""
        return self.accepted / (self.accepted + self.rejected) if self.accepted + self.rejected else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return len(self.tokens) / self.target_calls if self.target_calls else float("nan")


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, *, generator: torch.Generator) -> tuple[int, int]:
    """Speculative sampling's accept/reject step for one round.

    Args:
        p: target probabilities (k + 1, V) at the k drafted positions and the one after them.
        q: draft probabilities (k, V) the drafted tokens were drawn from.
        drafted: the k draft tokens.
        generator: the source of the uniforms and the resampling.

    Returns:
        (m, token): the first m drafted tokens are kept and `token` follows them; a token drawn from
        norm(max(0, p - q)) at the first rejection, or from p[k] (the bonus) when all k are accepted.
        Then P(the token at each position = x) = p(x): min(p, q) from acceptance plus max(0, p - q) from
        the residual.
    """
    k = drafted.numel()
    for i in range(k):
        x = int(drafted[i])
        if torch.rand((), generator=generator) * q[i, x] < p[i, x]:  # u < p/q, without dividing by q
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if not residual.sum() > 0:  # p == q up to rounding: rejection had probability ~0
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def expected_tokens_per_call(alpha: float, k: int) -> float:
    """Tokens per target call when each draft token is accepted independently with probability `alpha`:
    (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al. 2023, eq. 1)."""
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


@torch.no_grad()
def speculative_generate(target: GPT, draft: GPT, ids: torch.Tensor, max_new_tokens: int, *, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> SpeculativeResult:
    """Continue the prompt `ids` with the target model, the draft proposing `k` tokens per target call.

    Each round the draft runs k single-token steps (its KV cache kept), the target runs once on the
    new tokens with its cache, :func:`verify` keeps a prefix of the draft and appends one target token;
    both caches are then cropped back to the kept tokens. Greedy (temperature 0) gives exactly the
    target's greedy tokens; sampling gives tokens distributed as the target's samples (not the same
    draws as :func:`generate_tokens` with the same seed). k shrinks near ``max_new_tokens`` and the
    context end; past the target's context the target is rerun on its last ``block_size`` tokens, one
    token per call, without the draft.

    Args:
        target: the model whose distribution the output has.
        draft: a cheaper model with the same vocabulary.
        ids: prompt token ids (T,) or (1, T), 1 <= T <= the target's block_size.
        max_new_tokens: how many tokens to add (0 gives none).
        k: draft tokens per round, >= 1.
        temperature, top_k: as in :func:`generate_tokens`, applied to both models.
        seed: seeds the one generator used for every draw.

    Returns:
        A :class:`SpeculativeResult` (tokens (max_new_tokens,) and counts).

    Example:
        >>> r = speculative_generate(big, small, tok.encode("def "), 100, k=4); r.acceptance_rate
    """
    _check_sampling(max_new_tokens, temperature, top_k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise WorkbenchError(f"k (draft tokens per round) must be a positive integer, got {k!r}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise WorkbenchError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                             f"({target.config.vocab_size}); use a draft trained with the same tokenizer")
    seq = _check_prompt(target, ids)
    if seq.shape[0] != 1:
        raise WorkbenchError(f"speculative decoding runs one sequence at a time, got a batch of {seq.shape[0]}")
    seq = seq[0].tolist()
    bt, bd = target.config.block_size, draft.config.block_size
    gen = torch.Generator().manual_seed(seed)
    t_cache: KVCache | None = None
    d_cache: KVCache | None = None
    new: list[int] = []
    proposed = accepted = rejected = target_calls = draft_calls = 0

    def fed(cache: KVCache | None, n: int) -> tuple[KVCache | None, list[int]]:
        """The cache cropped to the first n - 1 tokens at most, and the tokens to feed after it."""
        if cache is not None and cache.length > n - 1:
            cache = cache.crop(n - 1) if n > 1 else None
        return cache, seq[cache.length if cache is not None else 0:]

    with _Eval(target, draft):
        while len(new) < max_new_tokens:
            n = len(seq)
            if n > bt:  # past the target's context: plain decoding on the last block_size tokens
                logits = target(torch.tensor([seq[-bt:]]))[0, -1:]
                target_calls += 1
                tok = int(torch.multinomial(_probs(logits, temperature, top_k)[0], 1, generator=gen))
                seq.append(tok)
                new.append(tok)
                continue
            # the target will hold n + kk positions, the draft n + kk - 1; a round yields at most kk + 1 tokens
            kk = max(0, min(k, max_new_tokens - len(new) - 1, bt - n, bd - n + 1))
            drafted, qs = [], []
            if kk:
                d_cache, feed = fed(d_cache, n)
                for _ in range(kk):
                    logits, d_cache = draft.step(torch.tensor([feed]), d_cache)
                    draft_calls += 1
                    q = _probs(logits[0, -1], temperature, top_k)
                    feed = [int(torch.multinomial(q, 1, generator=gen))]
                    drafted += feed
                    qs.append(q)
            t_cache, feed = fed(t_cache, n)
            logits, t_cache = target.step(torch.tensor([feed + drafted]), t_cache)
            target_calls += 1
            p = _probs(logits[0, -(kk + 1):], temperature, top_k)
            q = torch.stack(qs) if qs else p[:0]
            m, tok = verify(p, q, torch.tensor(drafted, dtype=torch.long), generator=gen)
            proposed, accepted, rejected = proposed + kk, accepted + m, rejected + (m < kk)
            seq += drafted[:m] + [tok]
            new += drafted[:m] + [tok]
    return SpeculativeResult(tokens=torch.tensor(new, dtype=torch.long), proposed=proposed, accepted=accepted,
                             rejected=rejected, target_calls=target_calls, draft_calls=draft_calls)

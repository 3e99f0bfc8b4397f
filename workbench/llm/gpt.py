"""A small decoder-only transformer (GPT): token + position embeddings, pre-norm blocks of causal
self-attention and MLP, optional weight tying; greedy/sampled generation; and an incremental forward
(:meth:`GPT.step`) that keeps each layer's keys and values in a :class:`KVCache`.

The layout follows nanoGPT (Karpathy): ``ln_1 -> attn.qkv -> attn.proj`` and ``ln_2 -> mlp.fc -> GELU
-> mlp.proj`` in every block, which is what the weight-only methods rely on: each LayerNorm feeds
exactly one Linear, so a per-input-channel scale can be folded into it (AWQ, SmoothQuant).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import WorkbenchError
from .corpus import CharTokenizer

__all__ = ["GPTConfig", "GPT", "KVCache", "generate"]


@dataclass(frozen=True)
class GPTConfig:
    """The architecture; validated on construction."""

    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    tie_weights: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkbenchError(f"GPT {f} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise WorkbenchError(f"GPT n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise WorkbenchError(f"GPT dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class KVCache:
    """Every layer's keys and values for the tokens seen so far, each (batch, heads, tokens, head_dim).

    Example:
        >>> logits, cache = model.step(prompt); logits, cache = model.step(next_id, cache); cache.length
    """

    layers: tuple[KV, ...]

    @property
    def length(self) -> int:
        """How many positions the cache holds (the position the next token gets)."""
        return self.layers[0][0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def crop(self, length: int) -> "KVCache":
        """The first `length` positions: what the cache held before later tokens were appended."""
        if not 0 <= length <= self.length:
            raise WorkbenchError(f"cannot crop a cache of {self.length} positions to {length}")
        return KVCache(tuple((k[:, :, :length], v[:, :, :length]) for k, v in self.layers))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)[0]

    def step(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Attend the new positions `x` (B, T, C) to `past` keys/values and themselves; returns the output
        and the keys/values with this call's appended."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        s = k.shape[2] - t  # positions already cached
        p = self.dropout if self.training else 0.0
        if s == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif t == 1:  # one new token may see every cached one: no mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            # new token i sits at position s + i and sees keys 0 .. s + i. (is_causal would align the mask
            # to the top-left corner, i.e. as if the chunk started at position 0.)
            mask = torch.ones(t, s + t, dtype=torch.bool, device=x.device).tril(diagonal=s)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)[0]

    def step(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn.step(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab).

    Example:
        >>> model = GPT(GPTConfig(vocab_size=103)); model(torch.zeros(1, 8, dtype=torch.long)).shape
        torch.Size([1, 8, 103])
    """

    def __init__(self, cfg: GPTConfig, *, seed: int = 0):
        super().__init__()
        self.config = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
            self.ln_f = nn.LayerNorm(cfg.n_embd)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.apply(self._init)
            # GPT-2: residual projections scaled by 1/sqrt(2 n_layer) so the stream's variance stays put.
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise WorkbenchError(f"sequence of length {t} is longer than the context length {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def step(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """The incremental forward: logits (B, T, vocab) of the new tokens `idx` (B, T) placed after the
        positions in `cache`, and the cache with their keys and values appended.

        ``model.step(idx)`` computes what ``model(idx)`` does (and returns the cache); the position
        embedding of new token i is that of position ``cache.length + i``, so the context is at most
        ``block_size`` positions: re-prefill from the last tokens when it is full (see workbench.llm.decode).

        Example:
            >>> logits, cache = model.step(prompt_ids)                   # prefill
            >>> logits, cache = model.step(logits[:, -1:].argmax(-1), cache)  # one more token
        """
        s, t = (cache.length if cache is not None else 0), idx.shape[1]
        if t < 1:
            raise WorkbenchError("step needs at least one new token, got an empty (B, 0) tensor")
        if s + t > self.config.block_size:
            raise WorkbenchError(f"{s} cached + {t} new positions exceed the context length {self.config.block_size}; "
                                 f"re-prefill from the last {self.config.block_size} tokens or fewer")
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise WorkbenchError(f"the cache has {len(cache.layers)} layers but the model has {len(self.blocks)}: "
                                 "it came from another model")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(s, s + t, device=idx.device)))
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block.step(x, cache.layers[i] if cache is not None else None)
            kvs.append(kv)
        return self.lm_head(self.ln_f(x)), KVCache(tuple(kvs))


@torch.no_grad()
def generate(model: GPT, tokenizer: CharTokenizer, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> str:
    """Continue `prompt`: greedy when `temperature` is 0, else sampled from softmax(logits / T).

    Sampling uses a generator seeded from `seed` (the global RNG is untouched), so the same call gives
    the same text. The context is cropped to the model's last ``block_size`` characters.

    Example:
        >>> generate(model, corpus.tokenizer, "def ", max_new_tokens=40, temperature=0.8, seed=1)
    """
    if not prompt:
        raise WorkbenchError("the prompt is empty: give at least one character to continue")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise WorkbenchError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise WorkbenchError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    ids = tokenizer.encode(prompt).unsqueeze(0)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -model.config.block_size:])[0, -1]
            if temperature == 0:
                nxt = logits.argmax().view(1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(ids[0, -max_new_tokens:]) if max_new_tokens else ""

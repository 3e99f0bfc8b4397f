"""Training the small GPT on the corpus (seeded AdamW, warmup + cosine), bits per character, and the
on-disk cache of the trained model.

A run is cached under ``cache_dir() / "llm" / <key>`` with ``model.pt`` and ``meta.json``; the key hashes
the model and training settings, the corpus's sha256 and the versions of python, torch and this code,
and an entry is written in a temporary folder then published with one rename.

Reproduce the cached default model (41 s on 2 idle cores, 107 s on one thread; more on a busy machine):
    python -c "from workbench.llm import pretrained; print(pretrained().meta)"
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import trange

from ..errors import WorkbenchError
from ..schedules import Schedule
from ..store import cache_dir, publish_dir
from ..train import show_progress
from .corpus import CharTokenizer, Corpus, load_corpus
from .gpt import GPT, GPTConfig

__all__ = ["TrainConfig", "Trained", "train", "evaluate_bpc", "eval_windows", "BPC", "pretrained", "cache_key",
           "LLM_VERSION"]

LLM_VERSION = "1"  # bump when training or evaluation code changes what a cached model is


@dataclass(frozen=True)
class TrainConfig:
    """How to train: model shape and optimization; validated on construction."""

    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    tie_weights: bool = True
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkbenchError(f"{f} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise WorkbenchError(f"lr must be a positive number, got {self.lr!r}")
        Schedule("cosine", total_steps=self.steps, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)
        self.gpt_config(vocab_size=1)  # the architecture's own checks, before any training or writing

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, mlp_ratio=self.mlp_ratio, tie_weights=self.tie_weights)


@dataclass(frozen=True)
class BPC:
    """Validation cross-entropy as bits per character and perplexity, over `chars` predicted characters."""

    bits_per_char: float
    perplexity: float
    chars: int


@dataclass
class Trained:
    """A trained model with its tokenizer, the corpus it came from and what was recorded about it."""

    model: GPT
    tokenizer: CharTokenizer
    corpus: Corpus
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"workbench": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "llm": LLM_VERSION}


def cache_key(config: TrainConfig, corpus: Corpus) -> str:
    blob = json.dumps({"config": asdict(config), "corpus": corpus.sha256, "split_at": corpus.split_at,
                       "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _windows(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows covering every position of `ids` once."""
    n = (len(ids) - 1) // block_size
    x = ids[:n * block_size].view(n, block_size)
    y = ids[1:n * block_size + 1].view(n, block_size)
    return x, y


def eval_windows(ids: torch.Tensor, block: int, max_chars: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input, target) windows every evaluation of bits per character uses: the first `max_chars`
    predicted characters (all by default) of `ids` in non-overlapping windows of the context length."""
    if max_chars is not None:
        ids = ids[:max_chars + 1]
    if len(ids) < block + 1:
        raise WorkbenchError(f"need at least {block + 1} characters to evaluate a context of {block}, got {len(ids)}")
    return _windows(ids, block)


@torch.no_grad()
def evaluate_bpc(model: GPT, ids: torch.Tensor, *, batch_size: int = 64, max_chars: int | None = None) -> BPC:
    """Bits per character of `model` on `ids` (the validation text), non-overlapping windows of the
    context length, so every held-out character is predicted once and the set is the same for every model.

    Example:
        >>> evaluate_bpc(trained.model, trained.corpus.ids("val")).bits_per_char
    """
    x, y = eval_windows(ids, model.config.block_size, max_chars)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size])
            total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten(), reduction="sum"))
    finally:
        model.train(was_training)
    nats = total / y.numel()
    return BPC(bits_per_char=nats / math.log(2), perplexity=math.exp(nats), chars=y.numel())


def train(config: TrainConfig = TrainConfig(), corpus: Corpus | None = None, *,
          progress: bool | None = None) -> Trained:
    """Train a GPT on `corpus`'s train split (seeded: random windows and init from ``config.seed``).

    AdamW (weight decay on matrices only), linear warmup then cosine decay from ``workbench.schedules``,
    gradient clipping. Returns the model in eval mode with its validation bits per character.
    """
    corpus = corpus if corpus is not None else load_corpus()
    corpus.check_context(config.block_size)
    cfg = config.gpt_config(corpus.tokenizer.vocab_size)
    model = GPT(cfg, seed=config.seed)
    data = corpus.ids("train")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.99))
    sched = Schedule("cosine", total_steps=config.steps, warmup_steps=config.warmup_steps,
                     min_lr_ratio=config.min_lr_ratio)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.factor)
    gen = torch.Generator().manual_seed(config.seed)
    offsets = torch.arange(config.block_size + 1)
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = trange(config.steps, desc="train gpt", disable=not show_progress(progress), leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.train()
        for _ in bar:
            starts = torch.randint(0, len(data) - config.block_size - 1, (config.batch_size,), generator=gen)
            chunk = data[starts[:, None] + offsets]
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            lr_sched.step()
            losses.append(loss.item())
            bar.set_postfix(bpc=f"{loss.item() / math.log(2):.3f}")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    val = evaluate_bpc(model, corpus.ids("val"))
    meta = {"config": asdict(config), "gpt": cfg.to_dict(), **corpus.identity(), "versions": _versions(),
            "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
            "threads": torch.get_num_threads(),
            "train_bpc_last": sum(losses[-20:]) / len(losses[-20:]) / math.log(2),
            "val_bpc": val.bits_per_char, "val_perplexity": val.perplexity, "val_chars": val.chars,
            "loss_curve": losses[::10]}
    return Trained(model=model, tokenizer=corpus.tokenizer, corpus=corpus, meta=meta)


def _load(entry: Path, corpus: Corpus) -> Trained:
    state = torch.load(entry / "model.pt", map_location="cpu", weights_only=True)
    meta = json.loads((entry / "meta.json").read_text())
    tok = CharTokenizer(state["chars"])
    if tok.chars != corpus.tokenizer.chars:
        raise ValueError("vocabulary mismatch")
    model = GPT(GPTConfig(**meta["gpt"]))
    model.load_state_dict(state["model"])
    return Trained(model=model.eval(), tokenizer=tok, corpus=corpus, meta=meta, path=entry)


def pretrained(config: TrainConfig = TrainConfig(), *, corpus: Corpus | None = None,
               cache: str | os.PathLike | None = None, progress: bool | None = None, retrain: bool = False) -> Trained:
    """The trained model for `config` from the cache, training (and caching) it on a miss.

    Args:
        config: model and training settings (the default trains in under a minute on 2 idle cores).
        corpus: default :func:`load_corpus` (``pydoc_data.topics``).
        cache: the cache root; default ``workbench.store.cache_dir()`` ($WORKBENCH_CACHE or ~/.cache/workbench).
        retrain: ignore a cached entry and replace it.

    Example:
        >>> t = pretrained(); print(t.meta["val_bpc"], t.meta["sha256"][:12], t.meta["python_version"])
    """
    corpus = corpus if corpus is not None else load_corpus()
    corpus.check_context(config.block_size)  # before anything is written
    root = cache_dir(cache) / "llm"
    key = cache_key(config, corpus)
    entry = root / key
    if not retrain and (entry / "meta.json").exists():
        try:
            return _load(entry, corpus)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError):
            pass  # damaged or foreign entry: train again and replace it
    trained = train(config, corpus, progress=progress)

    def fill(tmp: Path) -> None:
        torch.save({"model": trained.model.state_dict(), "chars": "".join(trained.tokenizer.chars)}, tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps({**trained.meta, "key": key}, indent=1))

    publish_dir(root, key, fill, is_complete=lambda e: (e / "meta.json").exists())
    trained.meta["key"] = key
    trained.path = entry
    return trained

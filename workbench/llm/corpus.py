"""The offline text corpus (``pydoc_data.topics``, shipped with Python) and a character-level tokenizer.

The corpus is the help text of the Python documentation's topics, concatenated in sorted key order
(about 465,000 characters). It differs between Python versions, so every figure computed on it is
recorded with ``python_version`` and ``sha256`` (see :class:`Corpus`). The split is deterministic:
the first 90% of the characters train, the last 10% are the held-out validation text.
"""

from __future__ import annotations

import hashlib
import math
import platform
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import WorkbenchError

__all__ = ["CharTokenizer", "Corpus", "load_corpus", "unigram_entropy", "CORPORA"]

# The corpora a Recipe can name (``Recipe(model="gpt", dataset="pydoc")``): all ship with Python.
CORPORA = ("pydoc",)


class CharTokenizer:
    """Characters to integer ids and back; the vocabulary is the sorted set of characters of a text.

    Example:
        >>> tok = CharTokenizer.from_text("hello"); tok.decode(tok.encode("hole"))
        'hole'
    """

    def __init__(self, chars: str | list[str]):
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars):
            raise WorkbenchError(f"a tokenizer needs distinct characters, got {len(chars)} "
                                 f"({len(set(chars))} distinct)")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise WorkbenchError("cannot build a vocabulary from an empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of `text` (int64); a character outside the vocabulary is a WorkbenchError naming it."""
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise WorkbenchError(f"{len(unknown)} character(s) not in the {self.vocab_size}-character vocabulary: "
                                 f"{shown}; remove or replace them")
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars)}


@dataclass(frozen=True)
class Corpus:
    """A text split into train/validation, its tokenizer and the identity recorded beside every figure."""

    name: str
    text: str
    split_at: int
    tokenizer: CharTokenizer
    sha256: str
    python_version: str

    @property
    def train_text(self) -> str:
        return self.text[:self.split_at]

    @property
    def val_text(self) -> str:
        return self.text[self.split_at:]

    def ids(self, split: str) -> torch.Tensor:
        if split not in ("train", "val"):
            raise WorkbenchError(f"unknown split {split!r}; known: train, val")
        return self.tokenizer.encode(self.train_text if split == "train" else self.val_text)

    def check_context(self, block_size: int) -> None:
        """A WorkbenchError unless both splits hold more than `block_size` + 1 characters."""
        short = min(len(self.train_text), len(self.val_text))
        if short < block_size + 2:
            raise WorkbenchError(f"corpus {self.name!r} is too short for context length {block_size}: its smaller "
                                 f"split has {short} characters, need at least {block_size + 2}; "
                                 "use a longer text or a shorter context")

    def identity(self) -> dict:
        return {"corpus": self.name, "sha256": self.sha256, "python_version": self.python_version,
                "chars": len(self.text), "vocab_size": self.tokenizer.vocab_size}


def load_corpus(text: str | None = None, *, name: str | None = None, val_fraction: float = 0.1) -> Corpus:
    """The ``pydoc_data.topics`` corpus (or `text`), split with the last `val_fraction` as validation.

    The vocabulary is built from the training split; a validation character outside it is an error.

    Example:
        >>> corpus = load_corpus(); corpus.identity()["chars"]   # ~465,000 on Python 3.11
    """
    if text is None:
        import pydoc_data.topics  # ships with CPython: no download

        topics = pydoc_data.topics.topics
        text = "".join(topics[k] for k in sorted(topics))
        name = name or "pydoc_topics"
    if not isinstance(text, str) or not text:
        raise WorkbenchError("the corpus text is empty: pass a non-empty string")
    if not 0.0 < val_fraction < 1.0:
        raise WorkbenchError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    split_at = len(text) - max(1, int(round(len(text) * val_fraction)))
    if split_at < 1:
        raise WorkbenchError(f"the corpus has {len(text)} character(s): too short to split into train and validation")
    tok = CharTokenizer.from_text(text[:split_at])
    unknown = sorted(set(text[split_at:]) - tok.index.keys())
    if unknown:
        raise WorkbenchError(f"the validation text has characters never seen in training: "
                             f"{' '.join(map(repr, unknown[:10]))}; change val_fraction")
    return Corpus(name=name or "text", text=text, split_at=split_at, tokenizer=tok,
                  sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), python_version=platform.python_version())


def unigram_entropy(text: str) -> float:
    """Bits per character of the text's own character frequencies: the bar a model with no context meets."""
    if not text:
        raise WorkbenchError("unigram entropy of an empty text is undefined")
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())

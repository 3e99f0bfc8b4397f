"""workbench.llm.corpus: the offline pydoc_data corpus, its split, the character tokenizer, unigram entropy."""

from __future__ import annotations

import hashlib
import math

import pytest

from workbench.errors import WorkbenchError
from workbench.llm import CharTokenizer, load_corpus, unigram_entropy


def test_corpus_is_pydoc_topics_in_sorted_order():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "".join(topics[k] for k in sorted(topics))
    c = load_corpus()
    assert c.text == text and c.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert 300_000 < len(c.text) < 700_000
    assert c.train_text + c.val_text == c.text
    assert len(c.val_text) == round(0.1 * len(c.text))
    assert c.identity()["python_version"].count(".") == 2
    assert load_corpus().split_at == c.split_at  # deterministic


def test_tokenizer_round_trip_and_vocabulary():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.decode(tok.encode("world hello")) == "world hello"


def test_unknown_characters_are_one_line_naming_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(WorkbenchError) as exc:
        tok.encode("abxzx")
    msg = str(exc.value)
    assert "\n" not in msg and "'x'" in msg and "'z'" in msg and "2 character(s)" in msg


def test_corpus_too_short_for_context():
    c = load_corpus("abcdefghij" * 10)
    with pytest.raises(WorkbenchError, match="too short for context length 64") as exc:
        c.check_context(64)
    assert "\n" not in str(exc.value)
    c.check_context(4)


def test_unigram_entropy_closed_form():
    assert unigram_entropy("abab") == pytest.approx(1.0)
    assert unigram_entropy("aaab") == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    with pytest.raises(WorkbenchError):
        unigram_entropy("")

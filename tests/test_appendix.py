"""The appendix pages (misconceptions notebook, FAQ, glossary): their cross-references resolve, the
glossary defines the book's terms, and the notebook is committed without outputs.

Nothing here executes the notebook (nbmake does: ``pytest notebooks --nbmake``); these checks
catch what a Sphinx build would only report as a warning, in a fraction of a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "appendix_misconceptions.ipynb"
FAQ = ROOT / "book" / "faq.md"
GLOSSARY = ROOT / "book" / "glossary.md"

# Terms the glossary must define (the book's vocabulary, as the appendix's brief lists it).
REQUIRED_TERMS = [
    "Pruning", "Sparsity", "Unstructured pruning", "Structured pruning", "N:M sparsity", "PTQ", "QAT",
    "Scale", "Zero point", "Per-channel quantization", "Per-group quantization", "Calibration", "SQNR",
    "Distillation", "Temperature", "Deep Compression", "K-means weight sharing", "Huffman coding",
    "BN folding", "ONNX", "Opset", "QDQ", "Execution provider", "DDP", "All-reduce",
    "Pipeline parallelism", "Registry", "Champion", "Challenger", "MACs", "p50", "p99", "GPTQ", "AWQ",
    "SmoothQuant", "Wanda", "SparseGPT", "Bits per character", "KV cache",
]


def toc_files() -> set[str]:
    """Every `file:` of _toc.yml (and the root), without extension."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.add(str(Path(node["file"]).with_suffix("")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return files


def notebook_markdown() -> str:
    nb = json.loads(NOTEBOOK.read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def notebook_code() -> str:
    nb = json.loads(NOTEBOOK.read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def glossary_terms() -> set[str]:
    """Term lines of the ```{glossary} block: unindented, non-empty, not an option."""
    block = re.search(r"```\{glossary\}\n(.*?)\n```", GLOSSARY.read_text(), re.S)
    assert block, "book/glossary.md has no ```{glossary} block"
    return {line.strip() for line in block.group(1).splitlines()
            if line.strip() and not line.startswith((" ", "\t", ":"))}


PAGES = {"notebook": notebook_markdown, "faq": FAQ.read_text, "glossary": GLOSSARY.read_text}


def test_appendix_pages_are_in_the_toc():
    files = toc_files()
    for page in ("notebooks/appendix_misconceptions", "book/faq", "book/glossary", "book/references"):
        assert page in files, f"_toc.yml does not list {page}"
    assert "book/misconceptions" not in files, "book/misconceptions.md became notebooks/appendix_misconceptions"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_doc_roles_point_to_pages_of_the_book(page):
    text = PAGES[page]()
    targets = re.findall(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`", text)
    assert targets, f"{page}: expected links to the chapters"
    files = toc_files()
    for target in targets:
        assert target.startswith("/"), f"{page}: use absolute {{doc}} targets, got {target!r}"
        assert target.lstrip("/") in files, f"{page}: {{doc}}`{target}` is not a page of _toc.yml"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_term_roles_name_glossary_terms(page):
    terms = {t.lower() for t in glossary_terms()}
    for term in re.findall(r"\{term\}`(?:[^`<]*<)?([^`>]+)>?`", PAGES[page]()):
        assert term.lower() in terms, f"{page}: {{term}}`{term}` is not defined in book/glossary.md"


def test_glossary_defines_the_books_terms():
    terms = glossary_terms()
    missing = [t for t in REQUIRED_TERMS if t not in terms]
    assert not missing, f"book/glossary.md lacks: {', '.join(missing)}"
    text = GLOSSARY.read_text()
    block = re.search(r"```\{glossary\}\n(.*?)\n```", text, re.S).group(1)
    # every term (or group of terms) is followed by an indented definition
    entries = re.split(r"\n\s*\n", block.strip())
    for entry in entries:
        lines = entry.splitlines()
        if lines[0].startswith(":"):
            continue
        assert any(line.startswith("  ") for line in lines), f"glossary entry without a definition: {lines[0]!r}"


def test_notebook_refs_and_glue_resolve():
    md, code = notebook_markdown(), notebook_code()
    labels = set(re.findall(r"^\(([\w-]+)\)=$", md, re.M))
    for ref in re.findall(r"\{ref\}`(?:[^`<]*<)?([^`>]+)>?`", md):
        assert ref in labels, f"{{ref}}`{ref}` has no ({ref})= target in the notebook"
    glued = set(re.findall(r"glue\(\"(\w+)\"", code))
    for name in re.findall(r"\{glue:text\}`(\w+)", md):
        assert name in glued, f"{{glue:text}}`{name}` is never glued by a code cell of the notebook"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook unexecuted"


def test_faq_types_no_measured_figures():
    """The FAQ has no code, so it may not state measured numbers: it points to the chapter instead."""
    text = FAQ.read_text()
    prose = re.sub(r"`[^`]*`", "", text)                                   # code and roles' targets
    prose = re.sub(r"\{doc\}", "", prose)
    figures = re.findall(r"\b\d+(?:\.\d+)?\s?(?:%|ms|µs|us|dB|KB|MB|x\b)", prose)
    allowed = {"90%", "4x"}                                                # quoted questions ("I pruned 90%", "MACs fell 4x")
    assert set(figures) <= allowed, f"book/faq.md types figures {sorted(set(figures) - allowed)}; glue them in a chapter"

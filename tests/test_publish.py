"""Checks of what publishing the book needs, without a browser and without the network.

* ``_config.yml`` holds ONE repository URL (``repository.url``); the repository button and
  the Binder and Colab launch links derive from it, and Thebe stays off (it would load code
  from the network).
* ``.github/workflows/pages.yml`` builds the site with the README's ``make book`` and
  deploys ``_build/html`` to GitHub Pages.
* ``binder/`` installs the package with the torch version ``pyproject.toml`` pins, CPU build.
* Every notebook's first code cell installs the package when it is missing (Colab), from the
  same repository URL. ``insert_install_cells()`` below writes that cell:
  ``.venv/bin/python tests/test_publish.py --insert-install-cells`` (idempotent; run it again
  after changing ``repository.url``).
* ``book/_static/workbench.css`` wraps long lines of code cells instead of scrolling them.
* When a built site is present (``make book``), its pages ask only for relative,
  on-machine assets, so it works offline and under a sub-path (https://OWNER.github.io/REPO/),
  and its search uses the local ``searchindex.js``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "_config.yml"
PYPROJECT = ROOT / "pyproject.toml"
WORKFLOW = ROOT / ".github" / "workflows" / "pages.yml"
BINDER = ROOT / "binder"
NOTEBOOKS = ROOT / "notebooks"
CSS = ROOT / "book" / "_static" / "workbench.css"
# The built site; WORKBENCH_SITE_DIR points the checks at a build made elsewhere.
HTML_DIR = Path(os.environ.get("WORKBENCH_SITE_DIR", ROOT / "_build" / "html"))

BINDERHUB_URL = "https://mybinder.org"
COLAB_URL = "https://colab.research.google.com"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
INSTALL_CELL_ID = "install-workbench"
INSTALL_CELL_TAGS = ["remove-cell"]  # the site does not show it; Colab, Binder, JupyterLab do


# ---------------------------------------------------------------------------------------------
# Helpers (also used by insert_install_cells)


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def repository_url(config: dict | None = None) -> str:
    """The one repository URL of the book, from ``_config.yml`` (``repository.url``)."""
    config = load_config() if config is None else config
    return str(config["repository"]["url"]).rstrip("/")


def torch_pin() -> str:
    """The exact torch requirement of pyproject.toml, e.g. ``torch==2.13.0``."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [d.replace(" ", "") for d in deps if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, f"pyproject.toml should pin torch exactly once, found {pins}"
    return pins[0]


def install_cell_source(url: str | None = None) -> str:
    """Source of the first code cell of every notebook: install the workbench if missing.

    A no-op where the package is installed (``make lab``, ``make book``, Binder); on Colab it
    installs the package from the book's repository, with the CPU build of PyTorch and the
    extras the chapters use (serve: chapter 10; myst-nb: ``myst_nb.glue``). Colab's Python
    may be newer than the 3.11 that pyproject.toml asks for, hence --ignore-requires-python.
    """
    url = repository_url() if url is None else url.rstrip("/")
    return (
        "# On Colab (or any fresh kernel): install the workbench from the book's repository.\n"
        "try:\n"
        "    import workbench  # noqa: F401\n"
        "except ImportError:\n"
        f"    %pip install -q --ignore-requires-python --extra-index-url {TORCH_CPU_INDEX} "
        f'"workbench[serve] @ git+{url}" "myst-nb>=1"'
    )


def is_install_cell(cell: dict, url: str) -> bool:
    """Does this code cell install the workbench from ``url`` when importing it fails?"""
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return (
        cell.get("cell_type") == "code"
        and re.search(r"^try:\s*\n\s+import workbench\b", src, re.M) is not None
        and re.search(r"^except (ModuleNotFoundError|ImportError)\b", src, re.M) is not None
        and re.search(r"^\s+[%!]pip install .*git\+" + re.escape(url) + r"[\"'@#\s]", src, re.M)
        is not None
    )


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def insert_install_cells(paths: list[Path] | None = None, url: str | None = None) -> list[Path]:
    """Make ``install_cell_source(url)`` the first code cell of each notebook.

    Replaces an existing install cell (one from another URL too) instead of adding a second;
    leaves every other cell untouched. Returns the notebooks that changed.
    """
    import nbformat

    url = repository_url() if url is None else url.rstrip("/")
    source = install_cell_source(url)
    changed = []
    for path in notebook_paths() if paths is None else paths:
        nb = nbformat.read(path, as_version=4)
        code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        first = code[0] if code else len(nb.cells)
        old = nb.cells[first] if code else None
        if old is not None and re.search(r"^try:\s*\n\s+import workbench\b", old.source, re.M):
            if old.source == source and old.metadata.get("tags") == INSTALL_CELL_TAGS:
                continue
            old.source = source
            old.metadata["tags"] = list(INSTALL_CELL_TAGS)
        else:
            cell = nbformat.v4.new_code_cell(source, metadata={"tags": list(INSTALL_CELL_TAGS)})
            ids = {c.get("id") for c in nb.cells}
            if INSTALL_CELL_ID not in ids:
                cell["id"] = INSTALL_CELL_ID
            nb.cells.insert(first, cell)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        changed.append(path)
    return changed


def css_rules(text: str) -> list[tuple[list[str], dict[str, str]]]:
    """(selectors, declarations) of each plain rule of a stylesheet (no @-blocks needed here)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", text):
        decls = {}
        for decl in body.split(";"):
            if ":" in decl:
                key, value = decl.split(":", 1)
                decls[key.strip().lower()] = value.strip()
        rules.append(([" ".join(s.split()) for s in selectors.split(",")], decls))
    return rules


# ---------------------------------------------------------------------------------------------
# _config.yml: one repository URL, launch links derived from it, nothing loaded on page load


def test_config_has_one_repository_url():
    config = load_config()
    url = repository_url(config)
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "github.com", url
    assert re.fullmatch(r"/[\w.-]+/[\w.-]+", parts.path) and not url.endswith(".git"), (
        f"repository.url should be https://github.com/OWNER/REPO (Binder and Colab links are "
        f"built from its two parts), not {url}"
    )
    text = CONFIG.read_text()
    assert text.count("github.com") == 1, "_config.yml should name the repository once, in repository.url"
    assert config["repository"].get("path_to_book", "") in ("", None), "the book sits at the repo root"
    assert config["repository"].get("branch"), "launch links need the branch"
    assert config["html"]["use_repository_button"] is True


def test_launch_buttons_are_links_derived_from_the_repository():
    buttons = load_config()["launch_buttons"]
    assert buttons["binderhub_url"].rstrip("/") == BINDERHUB_URL
    assert buttons["colab_url"].rstrip("/") == COLAB_URL
    assert buttons["thebe"] is False, "Thebe loads its JavaScript and a kernel from the network"
    assert buttons.get("notebook_interface") == "jupyterlab"
    for key in ("jupyterhub_url", "deepnote_url", "jupyterlite_url"):
        assert not buttons.get(key), f"{key}: only Binder and Colab are set up"
    # The providers' URLs hold no repository: the theme joins them with repository.url.
    for key in ("binderhub_url", "colab_url"):
        assert "github.com" not in buttons[key]


def test_config_translates_to_sphinx_theme_options():
    """Jupyter Book's own translation of _config.yml carries the URL to the theme."""
    jb_config = pytest.importorskip("jupyter_book.config")
    sphinx_config, _overrides, _paths = jb_config.yaml_to_sphinx(load_config())
    options = sphinx_config["html_theme_options"]
    assert options["repository_url"].rstrip("/") == repository_url()
    assert options["use_repository_button"] is True
    assert options["launch_buttons"]["thebe"] is False
    assert options["launch_buttons"]["colab_url"] and options["launch_buttons"]["binderhub_url"]


# ---------------------------------------------------------------------------------------------
# .github/workflows/pages.yml: `make book`, then deploy _build/html to GitHub Pages


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _uses(step: dict, action: str) -> bool:
    return str(step.get("uses", "")).split("@")[0] == action


def test_pages_workflow_builds_with_make_book_and_deploys_the_site():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers and "workflow_dispatch" in triggers
    assert wf["permissions"]["pages"] == "write" and wf["permissions"]["id-token"] == "write"
    assert wf["concurrency"]["group"]

    jobs = wf["jobs"]
    build = next(j for j in jobs.values() if any(s.get("run", "").strip() == "make book" for s in _steps(j)))
    assert "ubuntu" in build["runs-on"]
    python = [s for s in _steps(build) if _uses(s, "actions/setup-python")]
    assert python and str(python[0]["with"]["python-version"]) == "3.11"
    node = [s for s in _steps(build) if _uses(s, "actions/setup-node")]
    assert node and str(node[0]["with"]["node-version"]) == "20"
    upload = [s for s in _steps(build) if _uses(s, "actions/upload-pages-artifact")]
    assert upload and upload[0]["with"]["path"].rstrip("/") == "_build/html"
    names = [s.get("uses", s.get("run", "")) for s in _steps(build)]
    assert names.index(upload[0]["uses"]) > [n.strip() for n in names].index("make book")
    # The Makefile's `pip install -e .[all]` must get the CPU build of the pinned torch.
    assert TORCH_CPU_INDEX in build.get("env", {}).get("PIP_EXTRA_INDEX_URL", "")

    deploy_jobs = [j for j in jobs.values() if any(_uses(s, "actions/deploy-pages") for s in _steps(j))]
    assert len(deploy_jobs) == 1
    deploy = deploy_jobs[0]
    build_name = next(k for k, v in jobs.items() if v is build)
    needs = deploy["needs"] if isinstance(deploy["needs"], list) else [deploy["needs"]]
    assert build_name in needs
    assert deploy["environment"]["name"] == "github-pages"


# ---------------------------------------------------------------------------------------------
# binder/: the package with the pinned torch, CPU build


def test_binder_installs_the_package_with_the_pinned_cpu_torch():
    env = yaml.safe_load((BINDER / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    requires = tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]
    assert python == ["python=3.11"] and ">=3.11" in requires and "<3.12" in requires
    post = BINDER / "postBuild"
    text = post.read_text()
    assert text.startswith("#!/bin/bash") and "set -euo pipefail" in text
    assert post.stat().st_mode & 0o111, "repo2docker runs postBuild only if it is executable"
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    torch_line = next(i for i, ln in enumerate(lines) if "pip install" in ln and "torch" in ln)
    pin = torch_pin()  # torch==2.13.0
    assert f'"{pin}"' in lines[torch_line] or f" {pin}" in lines[torch_line]
    assert TORCH_CPU_INDEX in lines[torch_line]
    package_line = next(i for i, ln in enumerate(lines) if re.search(r"pip install .*-e \"?\.[\[\"\s]", ln))
    assert package_line > torch_line, "torch first, so `pip install -e .` keeps the CPU build"


# ---------------------------------------------------------------------------------------------
# Notebooks: the first code cell installs the package when it is missing (Colab)


def test_install_cell_is_valid_ipython():
    transformer = pytest.importorskip("IPython.core.inputtransformer2")
    src = install_cell_source()
    python = transformer.TransformerManager().transform_cell(src)
    compile(python, "<install cell>", "exec")
    assert "run_line_magic('pip'" in python
    assert is_install_cell({"cell_type": "code", "source": src}, repository_url())


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_notebook_first_code_cell_installs_the_workbench(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    assert is_install_cell(code[0], repository_url()), (
        f"{path.name}: the first code cell should install the workbench when it is missing, "
        f"from repository.url; run `.venv/bin/python tests/test_publish.py --insert-install-cells`. "
        f"Expected:\n{install_cell_source()}"
    )


def test_insert_install_cells_is_idempotent(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    src = notebook_paths()[0] if notebook_paths() else None
    if src is None:
        pytest.skip("no notebooks")
    copy = tmp_path / src.name
    copy.write_text(src.read_text())
    before = nbformat.read(copy, as_version=4)
    insert_install_cells([copy], url="https://github.com/example/first")
    assert insert_install_cells([copy], url="https://github.com/example/first") == []
    insert_install_cells([copy], url="https://github.com/example/second")  # URL changed: replaced
    after = nbformat.read(copy, as_version=4)
    code = [c for c in after.cells if c.cell_type == "code"]
    assert is_install_cell(code[0], "https://github.com/example/second")
    assert code[0].metadata["tags"] == INSTALL_CELL_TAGS
    installs = [c for c in code if "import workbench  # noqa: F401" in c.source]
    assert len(installs) == 1
    rest = [c for c in after.cells if c is not code[0]]
    others = [c.source for c in before.cells if "import workbench  # noqa: F401" not in c.source]
    assert [c.source for c in rest] == others  # every other cell untouched, whatever URL the original had


# ---------------------------------------------------------------------------------------------
# workbench.css: code cells wrap


def test_css_wraps_code_cells_and_keeps_the_widget_label():
    rules = css_rules(CSS.read_text())
    wrapping = {sel for sels, decls in rules for sel in sels if decls.get("white-space") == "pre-wrap"}
    for selector in ("div.cell div.cell_input pre", "div.cell div.cell_output pre", ".highlight pre"):
        assert selector in wrapping, f"{selector} should wrap (white-space: pre-wrap)"
    for sels, decls in rules:
        if decls.get("white-space") == "pre-wrap":
            assert decls.get("overflow-wrap") in ("anywhere", "break-word"), sels
            # Tables keep their layout: wrapping applies to <pre>, never to a table or its cells.
            for sel in sels:
                last = sel.split()[-1]
                assert not re.match(r"(table|td|th|tr)\b", last), sel
    # The existing rule labelling saved widget outputs is still there.
    assert any("widget-view+json" in sel for sels, _ in rules for sel in sels)


# ---------------------------------------------------------------------------------------------
# The built site (after `make book`): relative on-machine assets, local search, launch links


class _Assets(HTMLParser):
    """Collect the URLs a page loads by itself (scripts, styles, icons, images, frames)."""

    LOADED_RELS = {"stylesheet", "icon", "preload", "modulepreload", "prefetch", "manifest"}

    def __init__(self):
        super().__init__()
        self.loads: list[str] = []
        self.links: list[str] = []  # <a href>: followed only on a click

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "video", "audio", "embed") and a.get("src"):
            self.loads.append(a["src"])
        elif tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & self.LOADED_RELS:
            self.loads.append(a["href"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _built_pages() -> list[Path]:
    index = HTML_DIR / "index.html"
    if not index.is_file():
        pytest.skip("no built site: run `make book`")
    if (HTML_DIR / "searchindex.js").stat().st_mtime < CONFIG.stat().st_mtime:  # written every build
        pytest.skip("the built site is older than _config.yml: run `make book`")
    return sorted(p for p in HTML_DIR.rglob("*.html") if "_static" not in p.relative_to(HTML_DIR).parts)


def _parse(page: Path) -> _Assets:
    parser = _Assets()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return parser


def test_built_pages_load_only_relative_local_assets():
    problems = []
    for page in _built_pages():
        for url in _parse(page).loads:
            parts = urlsplit(url)
            if parts.scheme == "data":
                continue
            if parts.scheme or parts.netloc or url.startswith("/"):
                problems.append(f"{page.relative_to(HTML_DIR)}: {url}")
            elif not (page.parent / parts.path).resolve().is_file():
                problems.append(f"{page.relative_to(HTML_DIR)}: missing {url}")
    assert not problems, "absolute, off-site or missing assets (break offline / under /REPO/):\n" + "\n".join(
        problems[:40]
    )


def test_built_search_is_local():
    _built_pages()
    assert (HTML_DIR / "searchindex.js").is_file()
    search = _parse(HTML_DIR / "search.html").loads
    assert any(urlsplit(u).path == "searchindex.js" for u in search), search
    intro = (HTML_DIR / "book" / "intro.html").read_text()
    assert re.search(r'<form[^>]*action="\.\./search\.html"', intro), "the search box posts to the local page"


def test_built_launch_links_and_repository_button():
    pages = _built_pages()
    url = repository_url()
    owner_repo = urlsplit(url).path.strip("/")
    branch = load_config()["repository"]["branch"]
    notebooks = [p for p in pages if p.parent.name == "notebooks"]
    assert notebooks
    for page in notebooks:
        links = _parse(page).links
        name = f"notebooks/{page.stem}.ipynb"
        assert f"{COLAB_URL}/github/{owner_repo}/blob/{branch}/{name}" in links, page.name
        assert f"{BINDERHUB_URL}/v2/gh/{owner_repo}/{branch}?urlpath=lab/tree/{name}" in links, page.name
        assert url in links, f"{page.name}: repository button"
    text = "\n".join(p.read_text() for p in pages)
    assert "launch-thebe" not in text and "initThebeSBT()" not in text, "a Thebe button"


if __name__ == "__main__":
    if sys.argv[1:] == ["--insert-install-cells"]:
        for changed in insert_install_cells():
            print(f"install cell written: {changed.relative_to(ROOT)}")
    elif sys.argv[1:] == ["--print-install-cell"]:
        print(install_cell_source())
    else:
        sys.exit("usage: python tests/test_publish.py --insert-install-cells | --print-install-cell")

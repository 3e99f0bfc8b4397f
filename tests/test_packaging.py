"""The setup contract: pins, extras, console script, conda env, README commands, CI entry point."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements):
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_pins_and_dependencies():
    deps = PYPROJECT["project"]["dependencies"]
    assert "torch==2.13.0" in deps, "torch must be pinned: an unpinned torch pulls the CUDA build"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(r.startswith("jupyter-book>=1.0.4,<2") for r in extras["book"]), "Jupyter Book 1, not 2.x"
    everything = _names(deps) | _names(sum(extras.values(), []))
    for name in ("onnx", "onnxruntime", "matplotlib", "plotly", "ipywidgets", "anywidget", "scikit-learn",
                 "tqdm", "jupyterlab", "nbmake", "pytest", "playwright", "jupyter-book"):
        assert name in everything, name
    assert PYPROJECT["project"]["scripts"]["workbench"] == "workbench.cli:main"
    assert set(extras["all"][0].split("[")[1].rstrip("]").split(",")) == set(extras) - {"all"}


def test_conda_environment_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e .[all]"], "the conda env installs the package with all its extras, like make"
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")


def test_readme_ci_and_makefile_agree():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[1] for line in first_block.strip().splitlines()][:2] == ["book", "test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "apt-get update" in ci and "chromium" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("book", "test", "lab", "bench", "portability"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "--nbmake" in makefile and "tests" in makefile
    # The portability check runs in CI (make test) under a second numeric configuration and cache.
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "portability" in test_recipe
    for pin in ("ATEN_CPU_CAPABILITY=avx2", "MKL_CBWR=AVX2", "ONEDNN_MAX_CPU_ISA=AVX2", "OMP_NUM_THREADS=1",
                "WORKBENCH_CACHE="):
        assert pin in makefile, pin
    assert "--only margins --check" in makefile


def test_every_notebook_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.stem}" in toc, f"{nb.name} is not in _toc.yml, so the book would skip it"


def test_notebooks_are_valid_nbformat_with_cell_ids():
    """A cell without an id is a warning today and an error in future nbformat versions."""
    import json

    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        raw = json.loads(path.read_text())
        assert all("id" in cell for cell in raw["cells"]), f"{path.name}: a cell has no id (run nbformat.validator.normalize)"
        nbformat.validate(nbformat.reads(path.read_text(), as_version=4))

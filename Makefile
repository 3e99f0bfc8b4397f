# The README's commands. Everything installs into .venv from this repo's own files.
#   make book   execute every notebook and build the site into _build/html
#   make test   unit tests + notebooks (nbmake) + the site check in headless Chromium
#   make lab    JupyterLab on the notebooks, widgets working
#   make bench  measured figures -> _build/bench.json
#   make portability  the bars over seeds 0..4, chapter 12's and the harder task's bars and every notebook under a second numeric configuration
#   make browser-assets  ONNX Runtime Web (npm ci, pinned in package-lock.json) -> book/_static/browser/ort/
#   make student     the student edition (solutions removed, graders kept) + autograders -> _build/editions/
#   make instructor  the instructor edition (solutions and answers kept) -> _build/editions/instructor/
#   make autograde NB=path/to/02_pruning.ipynb   score a student's notebook, exercise by exercise

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# One result cache for the book, the tests' notebooks and the bench, inside the project.
export WORKBENCH_CACHE ?= $(CURDIR)/.cache/workbench
# Training progress bars are for people, not for the built site or CI logs. Graders are strict in
# the book build and the tests: the book's own solutions (the instructor edition) must pass every one.
BOOK_ENV := WORKBENCH_PROGRESS=0 WORKBENCH_GRADING_STRICT=1
# The second numeric configuration of the portability check (README, "Portable numbers"): AVX2
# kernels in ATen, oneDNN and MKL instead of this CPU's widest, one thread instead of two, and a
# result cache of its own, so that every asserted figure is computed again the way another x86-64
# CPU computes it (each of these settings alone changes trained weights bit for bit).
PORTABLE_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 OMP_NUM_THREADS=1 \
                WORKBENCH_CACHE=$(CURDIR)/.cache/workbench-avx2

.PHONY: setup book test unit lab bench portability clean browser-assets llm-cache hard-cache student instructor autograde

# Chapter 11 runs the models in the reader's browser with ONNX Runtime Web, served from the site
# itself (no CDN): npm installs the version pinned in package-lock.json, and its WebAssembly
# runtime (the wasm-only ES module and the SIMD build it loads) is copied next to the page's code.
NPM        ?= npm
ORT_DIST   := node_modules/onnxruntime-web/dist
ORT_STATIC := book/_static/browser/ort
ORT_FILES  := ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm
NPM_STAMP  := node_modules/.workbench-stamp

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else "need Python 3.11 (found %d.%d): set PYTHON=/path/to/python3.11" % v)'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the workbench and its tools into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[all]"
	@touch $(STAMP)

browser-assets: $(ORT_STATIC)/.stamp

$(NPM_STAMP): package.json package-lock.json
	$(if $(shell command -v $(NPM) 2>/dev/null),,$(error npm not found: chapter 11 needs it to install ONNX Runtime Web; install Debian's packages with: apt-get install nodejs npm))
	$(NPM) ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

$(ORT_STATIC)/.stamp: $(NPM_STAMP)
	@mkdir -p $(ORT_STATIC)
	cp $(addprefix $(ORT_DIST)/,$(ORT_FILES)) $(ORT_STATIC)/
	@touch $@

# Chapter 12's GPT (under a minute on 2 idle cores, then cached), every compressed version that the
# chapter and its explorer show, and chapter 13's draft model are computed once,
# into the same cache, by the bench's llm group,
# which also checks their bars: the notebook then answers from the cache within its 90 s.
llm-cache: $(STAMP)
	$(BOOK_ENV) $(BIN)/workbench bench --only llm --check --json _build/bench-llm.json

# The harder task's models (MNIST-1D, chapters 3-5's "On a harder task" sections) likewise: the bench's
# hard group trains them into the cache and checks their bars, so the chapters answer from the cache.
hard-cache: $(STAMP)
	$(BOOK_ENV) $(BIN)/workbench bench --only hard --check --json _build/bench-hard.json

book: browser-assets llm-cache hard-cache $(STAMP)
	# _config.yml sets execute.raise_on_error, so a notebook that raises fails this command;
	# -W turns Sphinx warnings (a broken reference, a missing figure) into failures too.
	$(BOOK_ENV) $(BIN)/jupyter-book build . --all -W --keep-going
	@echo "site: $(CURDIR)/_build/html/index.html"

# Editions of the chapters for a course (workbench/editions.py, with otter-grader).
student: $(STAMP)
	$(BIN)/workbench edition student --out _build/editions

instructor: $(STAMP)
	$(BIN)/workbench edition instructor --out _build/editions

autograde: $(STAMP)
	$(if $(NB),,$(error name the student's notebook: make autograde NB=path/to/02_pruning.ipynb))
	$(BIN)/workbench autograde $(NB) --editions _build/editions

test: book
	$(BOOK_ENV) $(BIN)/python -m pytest tests notebooks --nbmake --nbmake-timeout=180 -p no:cacheprovider
	$(MAKE) --no-print-directory portability

# Every accuracy bar over seeds 0..4 in both configurations, then every notebook (the chapters'
# asserted figures) again in the second one. Fails, one line per figure, if a bar has no margin.
portability: $(STAMP)
	$(BOOK_ENV) $(BIN)/workbench bench --only margins --check --json _build/margins.json
	$(BOOK_ENV) env $(PORTABLE_ENV) $(BIN)/workbench bench --only margins --check --json _build/margins-avx2.json
	$(BOOK_ENV) env $(PORTABLE_ENV) $(BIN)/workbench bench --only llm --check --json _build/bench-llm-avx2.json
	$(BOOK_ENV) env $(PORTABLE_ENV) $(BIN)/workbench bench --only hard --check --json _build/bench-hard-avx2.json
	$(BOOK_ENV) env $(PORTABLE_ENV) $(BIN)/python -m pytest notebooks --nbmake --nbmake-timeout=300 -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest tests -p no:cacheprovider

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)
	$(BIN)/workbench bench --json _build/bench.json

clean:
	rm -rf _build .cache book/_static/browser/models

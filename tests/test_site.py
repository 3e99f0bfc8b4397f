"""Open every page of the built book in headless Chromium and check it renders offline.

Run after `make book`:  pytest -m site tests/test_site.py

The site in _build/html is served from 127.0.0.1 under a sub-path (/workbench/, as a project
site on GitHub Pages is: a URL that assumes the site root fails) and every page listed in
_toc.yml is loaded in Debian's Chromium (driven by the `playwright` Python package; no browser
is ever downloaded). A page fails on:

* a request to any host other than 127.0.0.1 (a CDN leak: the book must work offline),
* a failed request or a response with status >= 400,
* a console message of type "error" or an uncaught JavaScript exception,
* a plotly figure (.plotly-graph-div / .js-plotly-plot) that drew no svg.main-svg,
* an <img> that did not load (naturalWidth 0) or that is shown with a 0x0 box,
* math that MathJax left untypeset, or an empty main content area,
* a message of chapter 11's in-browser demo (.wb-browser-error: a model that did not load).

Two more checks, with their figures written to _build/site-check.json:

* every static explorer (a plotly figure with layout.sliders): two clicks on slider steps must
  each change the drawn traces;
* chapter 11 (notebooks/10_browser): ONNX Runtime Web classifies the whole test split with every
  variant; each must agree with ONNX Runtime in Python on >= 98% of the images and score within
  0.5 points of the Python accuracy; a stroke drawn on the canvas with the mouse gets a prediction.
  Latencies are recorded (the int8/fp32 ratio next to the native one), never asserted: they
  depend on the machine.

A full-page screenshot of each page goes to _build/screenshots/<page>.png.
"""

from __future__ import annotations

import functools
import http.server
import json
import posixpath
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.site

ROOT = Path(__file__).resolve().parents[1]
HTML_DIR = ROOT / "_build" / "html"
SCREENSHOT_DIR = ROOT / "_build" / "screenshots"
SITE_CHECK_JSON = ROOT / "_build" / "site-check.json"
TOC = ROOT / "_toc.yml"
SUB_PATH = "/workbench"   # the site is served from here, as a GitHub Pages project site is
BROWSER_PAGE = "notebooks/10_browser"
BROWSER_MANIFEST = HTML_DIR / "_static" / "browser" / "models" / "manifest.json"
MIN_AGREEMENT = 0.98        # browser vs ONNX Runtime in Python, per variant: other kernels, other sums
MAX_ACCURACY_GAP_PP = 0.5   # browser accuracy vs the Python figure, in points
BROWSER_TIMEOUT_MS = 180_000

# We run as root in containers (hence --no-sandbox); the rest stops Chromium from
# calling Google services on its own, which would show up as non-local requests.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOST = "127.0.0.1"
LOCAL_SCHEMES = {"data", "blob", "about"}
PAGE_TIMEOUT_MS = 60_000


def toc_pages(toc_path: Path = TOC) -> list[str]:
    """Pages of the book in TOC order: the root, then every `file:` entry, recursively."""
    toc = yaml.safe_load(toc_path.read_text())
    pages: list[str] = []

    def add(name: str) -> None:
        name = str(name)
        for suffix in (".ipynb", ".md", ".rst"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if name not in pages:
            pages.append(name)

    def walk(node) -> None:
        if isinstance(node, dict):
            if "file" in node:
                add(node["file"])
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    add(toc["root"])
    walk(toc)
    return pages


def screenshot_name(page: str) -> str:
    return page.replace("/", "__") + ".png"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site under SUB_PATH only: a request outside it (an absolute URL) gets a 404."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm"}

    def translate_path(self, path):
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if clean != SUB_PATH and not clean.startswith(SUB_PATH + "/"):
            return posixpath.join(self.directory, "__outside_the_sub_path__")
        return super().translate_path(path[len(SUB_PATH):] or "/")

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    if path is None:
        pytest.skip(
            "Chromium not found: install Debian's package 'chromium' "
            "(apt-get install chromium) to run the site check"
        )
    return path


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "Python package 'playwright' not found: pip install playwright to run the "
            "site check (it drives Debian's chromium; never run `playwright install`)"
        )
    return sync_playwright


@pytest.fixture(scope="module")
def site_url(chromium_path, sync_playwright) -> Iterator[str]:
    """Serve _build/html on 127.0.0.1 at a free port, for the whole module."""
    handler = functools.partial(_QuietHandler, directory=str(HTML_DIR))
    server = http.server.ThreadingHTTPServer((LOCAL_HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOCAL_HOST}:{server.server_address[1]}{SUB_PATH}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(chromium_path, sync_playwright):
    """One headless Chromium for every page."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


# Runs in the page after the network is idle. Opens collapsed blocks so that what they
# hold is checked (and screenshotted) too, waits for MathJax and for images, then
# reports what is wrong as a list of strings.
_INSPECT_JS = r"""
async () => {
  const problems = [];
  document.querySelectorAll("details").forEach((d) => { d.open = true; });

  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (e) { problems.push("MathJax failed: " + e); }
  }
  // Math that MathJax should have typeset but left as TeX source.
  const mathNodes = document.querySelectorAll("div.math, span.math");
  const untypeset = [...mathNodes].filter((el) => !el.querySelector("mjx-container"));
  if (untypeset.length) {
    problems.push(`${untypeset.length} math element(s) not typeset by MathJax, e.g. `
      + JSON.stringify(untypeset[0].textContent.trim().slice(0, 60)));
  }

  const imgs = [...document.images];
  imgs.forEach((img) => { if (img.loading === "lazy") img.loading = "eager"; });
  await Promise.race([
    Promise.all(imgs.map((img) => img.decode().catch(() => null))),
    new Promise((resolve) => setTimeout(resolve, 10000)),
  ]);
  for (const img of imgs) {
    const src = img.getAttribute("src") || "(no src)";
    if (img.naturalWidth === 0) {
      problems.push(`image did not load (naturalWidth 0): ${src}`);
      continue;
    }
    const box = img.getBoundingClientRect();
    // Images hidden on purpose (display: none, e.g. the theme's light/dark logo
    // variants) have a 0x0 box too; only a displayed image with no size is a bug.
    if (box.width === 0 && box.height === 0 && img.checkVisibility()) {
      problems.push(`image rendered with a 0x0 box: ${src}`);
    }
  }

  const plots = new Set(document.querySelectorAll(".plotly-graph-div, .js-plotly-plot"));
  for (const plot of plots) {
    if (!plot.querySelector("svg.main-svg")) {
      problems.push(`plotly figure #${plot.id || "?"} was not drawn (no svg.main-svg);`
        + ` is plotly.min.js loaded? typeof Plotly = ${typeof window.Plotly}`);
    }
  }

  const main = document.querySelector("article.bd-article, main#main-content, main, [role=main]");
  if (!main) {
    problems.push("no main content element (article.bd-article / main)");
  } else {
    const text = main.innerText.trim();
    const media = main.querySelector("img, svg, canvas, video, iframe");
    if (!text && !media) problems.push("main content is empty");
  }
  return problems;
}
"""


def _wait_network_idle(
    page, in_flight: set, quiet_s: float = 0.5, timeout_s: float = PAGE_TIMEOUT_MS / 1000
) -> None:
    """Return once no request has been in flight for quiet_s seconds."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while True:
        now = time.monotonic()
        if in_flight:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return
        if now > deadline:
            pending = ", ".join(sorted(r.url for r in in_flight)) or "?"
            raise TimeoutError(f"network not idle after {timeout_s:.0f} s; pending: {pending}")
        page.wait_for_timeout(50)  # lets Playwright deliver the request events


# The static explorers on a page: plotly figures with sliders, and how many steps each has.
_EXPLORERS_JS = r"""
() => [...document.querySelectorAll(".js-plotly-plot")]
  .filter((gd) => gd.layout && gd.layout.sliders && gd.layout.sliders.length)
  .map((gd, i) => { if (!gd.id) gd.id = `wb-explorer-${i}`;
                    return { id: gd.id, steps: gd.layout.sliders[0].steps.length,
                             active: gd.layout.sliders[0].active || 0 }; })
"""

# What the traces of one figure look like now (every trace layer's SVG), and where to click on its
# slider to choose step `step`: the tick's x, the rail's y, in page coordinates.
_TRACES_JS = r"""
(id) => {
  const gd = document.getElementById(id);
  const layers = ".cartesianlayer, .polarlayer, .ternarylayer, .geolayer, .pielayer, .funnelarealayer, "
    + ".treemaplayer, .sunburstlayer, .iciclelayer, .indicatorlayer";
  return [...gd.querySelectorAll(layers)].map((l) => l.innerHTML).join("|");
}
"""
_STEP_XY_JS = r"""
([id, step]) => {
  const gd = document.getElementById(id);
  const ticks = gd.querySelectorAll(".slider-container .slider-tick-rect");
  const rail = gd.querySelector(".slider-container .slider-rail-touch-rect")
            || gd.querySelector(".slider-container .slider-rail-rect");
  if (!ticks[step] || !rail) return null;
  rail.scrollIntoView({ block: "center" });   // the slider, not the figure: a tall figure hides it
  const t = ticks[step].getBoundingClientRect(), r = rail.getBoundingClientRect();
  return [t.left + t.width / 2, r.top + r.height / 2];
}
"""


def _check_explorers(page) -> tuple[list[int], list[str]]:
    """Click two slider steps of every static explorer; each click must change the drawn traces."""
    steps, problems = [], []
    for fig in page.evaluate(_EXPLORERS_JS):
        steps.append(fig["steps"])
        n, active = fig["steps"], fig["active"]
        if n < 2:
            problems.append(f"static explorer #{fig['id']} has {n} slider step(s): nothing to explore")
            continue
        for step in ((active + 1) % n, (active + 2) % n if n > 2 else active):
            before = page.evaluate(_TRACES_JS, fig["id"])
            xy = page.evaluate(_STEP_XY_JS, [fig["id"], step])
            if xy is None:
                problems.append(f"static explorer #{fig['id']}: no slider tick for step {step}")
                break
            page.mouse.click(*xy)
            try:
                page.wait_for_function(f"(b) => ({_TRACES_JS})({json.dumps(fig['id'])}) !== b", arg=before,
                                       timeout=5_000)
            except Exception:
                problems.append(f"static explorer #{fig['id']}: clicking slider step {step} of {n} "
                                "did not change the drawn traces")
                break
    return steps, problems


def _draw_a_seven(page) -> None:
    canvas = page.locator("canvas.wb-draw")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + 60, y0 + 40)
    page.mouse.down()
    for x, y in ((160, 40), (150, 80), (110, 140), (90, 200)):
        page.mouse.move(x0 + x, y0 + y, steps=5)
    page.mouse.up()


def _check_browser_chapter(page) -> tuple[dict, list[str]]:
    """Chapter 11: wait for the page to classify the test split, then draw a digit on its canvas."""
    figures: dict = {}
    problems: list[str] = []
    page.wait_for_function("() => window.workbenchBrowser && window.workbenchBrowser.finished",
                           timeout=BROWSER_TIMEOUT_MS)
    done = page.evaluate("() => window.workbenchBrowser.finished")
    problems += [f"in-browser demo: {e}" for e in done["errors"]]
    manifest = json.loads(BROWSER_MANIFEST.read_text())
    for v in manifest["variants"]:
        name, r = v["name"], done["results"].get(v["name"])
        if r is None:
            problems.append(f"variant {name} was not run in the browser")
            continue
        figures[f"browser_agreement_{name}"] = r["agreement"]
        figures[f"browser_accuracy_{name}"] = r["accuracy"]
        figures[f"python_accuracy_{name}"] = v["accuracy"]
        figures[f"browser_latency_us_{name}"] = r["latency_us"]
        figures[f"native_ort_p50_us_{name}"] = v["native_ort_p50_us"]
        if r["agreement"] < MIN_AGREEMENT:
            problems.append(f"variant {name}: the browser agrees with ONNX Runtime in Python on "
                            f"{r['agreement']:.1%} of the test images (at least {MIN_AGREEMENT:.0%} expected)")
        if abs(r["accuracy"] - v["accuracy"]) * 100 > MAX_ACCURACY_GAP_PP:
            problems.append(f"variant {name}: accuracy {r['accuracy']:.4f} in the browser, {v['accuracy']:.4f} "
                            f"in Python (at most {MAX_ACCURACY_GAP_PP} points apart)")
    native = {v["name"]: v["native_ort_p50_us"] for v in manifest["variants"]}
    figures["browser_latency_ratio_int8_over_fp32"] = done["latency_ratio_int8_over_fp32"]
    figures["native_latency_ratio_int8_over_fp32"] = (native["int8"] / native["fp32"]
                                                      if native.get("int8") and native.get("fp32") else None)
    prompt = page.locator(".wb-prediction").inner_text()
    if "draw a digit" not in prompt.lower():
        problems.append(f"the empty canvas shows {prompt!r}, not a prompt to draw a digit")
    _draw_a_seven(page)
    try:
        page.wait_for_function("() => document.querySelector('.wb-prediction').dataset.digit", timeout=30_000)
        figures["drawing_prediction"] = int(page.locator(".wb-prediction").get_attribute("data-digit"))
    except Exception as exc:
        problems.append(f"a stroke drawn on the canvas got no prediction ({type(exc).__name__})")
    return figures, problems


def _check_page(browser, base_url: str, page_name: str) -> tuple[list[str], dict]:
    """Load one page; return its problems (empty when it is fine) and its figures for site-check.json."""
    problems: list[str] = []
    external: list[str] = []
    figures: dict = {}

    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")

    def route(route_, request):
        parts = urlsplit(request.url)
        if parts.scheme in LOCAL_SCHEMES or parts.hostname == LOCAL_HOST:
            route_.continue_()
        else:
            external.append(request.url)
            route_.abort()  # nothing may leave the machine; fail fast instead of waiting

    context.route("**/*", route)
    page = context.new_page()
    in_flight: set = set()
    page.on("request", lambda req: in_flight.add(req))
    page.on("requestfinished", lambda req: in_flight.discard(req))

    def on_console(msg):
        # "Failed to load resource" repeats a failed request or an HTTP error, which
        # are reported (with their URL) by the handlers below.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            problems.append(f"console error: {msg.text} ({msg.location.get('url', '')})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"uncaught JavaScript error: {exc}"))

    def on_request_failed(req):
        in_flight.discard(req)
        if req.url not in external:
            problems.append(f"request failed: {req.url} ({req.failure})")

    page.on("requestfailed", on_request_failed)
    page.on(
        "response",
        lambda resp: problems.append(f"HTTP {resp.status}: {resp.url}") if resp.status >= 400 else None,
    )
    try:
        # Playwright's own "networkidle" proved flaky here (it can fire while the parser
        # is still busy with plotly.min.js, 4.6 MB, or not at all): wait for "load",
        # then count requests in flight ourselves.
        page.goto(f"{base_url}/{page_name}.html", wait_until="load", timeout=PAGE_TIMEOUT_MS)
        _wait_network_idle(page, in_flight)
        problems.extend(page.evaluate(_INSPECT_JS))
        _wait_network_idle(page, in_flight)  # images and fonts requested by the checks
        if page_name == BROWSER_PAGE:
            found, trouble = _check_browser_chapter(page)
            figures.update(found)
            problems.extend(trouble)
        errors = page.locator(".wb-browser-error").all_inner_texts()
        problems.extend(f"message on the page: {e}" for e in errors)
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / screenshot_name(page_name)), full_page=True)
        steps, trouble = _check_explorers(page)   # after the screenshot: it shows each figure's first state
        figures["static_explorer_steps"] = steps
        problems.extend(trouble)
    except Exception as exc:  # a timeout or a crash is a problem of this page, not the run
        problems.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        context.close()

    problems.extend(f"request to a non-local host (CDN leak?): {url}" for url in external)
    return list(dict.fromkeys(problems)), figures


@pytest.fixture(scope="module")
def site_report(site_url, browser) -> dict:
    """Check every page once; write the figures to _build/site-check.json; return problems and figures."""
    if not (HTML_DIR / "index.html").is_file():
        pytest.fail("site not built: run `make book` first", pytrace=False)
    pages = toc_pages()
    missing = [p for p in pages if not (HTML_DIR / f"{p}.html").is_file()]
    problems = {p: [f"page listed in _toc.yml but {p}.html was not built"] for p in missing}
    figures: dict = {"base_url": site_url, "pages": pages, "static_explorer_steps": {}}
    for page_name in pages:
        if page_name in missing:
            continue
        problems[page_name], found = _check_page(browser, site_url, page_name)
        steps = found.pop("static_explorer_steps", [])
        if steps:
            figures["static_explorer_steps"][page_name] = steps
        figures.update(found)
    figures["problems"] = {p: v for p, v in problems.items() if v}
    SITE_CHECK_JSON.parent.mkdir(parents=True, exist_ok=True)
    SITE_CHECK_JSON.write_text(json.dumps(figures, indent=1))
    return {"problems": problems, "figures": figures}


def test_toc_pages(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\n"
        "root: book/intro\n"
        "parts:\n"
        "  - caption: Chapters\n"
        "    chapters:\n"
        "      - file: notebooks/01_baseline.ipynb\n"
        "        sections:\n"
        "          - file: notebooks/01a_extra\n"
        "  - caption: Appendix\n"
        "    chapters:\n"
        "      - file: book/references.md\n"
        "      - url: https://example.org\n"
    )
    assert toc_pages(toc) == [
        "book/intro", "notebooks/01_baseline", "notebooks/01a_extra", "book/references"
    ]
    assert screenshot_name("notebooks/01_baseline") == "notebooks__01_baseline.png"


def test_sub_path_server_refuses_urls_outside_it(site_url):
    import urllib.error
    import urllib.request

    root = site_url[: -len(SUB_PATH)]
    with urllib.request.urlopen(f"{site_url}/index.html") as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{root}/index.html")


def test_every_page_renders_offline(site_report):
    report = [f"{page}: {problem}" for page, found in site_report["problems"].items() for problem in found]
    assert not report, (
        f"{len(report)} problem(s) in the built site served at {SUB_PATH}/ "
        f"(screenshots in {SCREENSHOT_DIR.relative_to(ROOT)}/, figures in "
        f"{SITE_CHECK_JSON.relative_to(ROOT)}):\n  " + "\n  ".join(report)
    )


def test_models_run_in_the_browser(site_report):
    """Chapter 11's figures: every variant agrees with Python and scores as in Python, the canvas predicts."""
    if BROWSER_PAGE not in toc_pages():
        pytest.skip(f"{BROWSER_PAGE} is not in _toc.yml")
    figures = site_report["figures"]
    manifest = json.loads(BROWSER_MANIFEST.read_text())
    for v in manifest["variants"]:
        name = v["name"]
        assert figures.get(f"browser_agreement_{name}", 0) >= MIN_AGREEMENT, (name, figures)
        assert abs(figures[f"browser_accuracy_{name}"] - v["accuracy"]) * 100 <= MAX_ACCURACY_GAP_PP, (name, figures)
    assert figures.get("drawing_prediction") in range(10), figures
    assert figures["browser_latency_ratio_int8_over_fp32"] > 0 and figures["native_latency_ratio_int8_over_fp32"] > 0

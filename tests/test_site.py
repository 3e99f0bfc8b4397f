"""Open every page of the built book in headless Chromium and check it renders offline.

Run after `make book`:  pytest -m site tests/test_site.py

The site in _build/html is served from 127.0.0.1 and every page listed in _toc.yml is
loaded in Debian's Chromium (driven by the `playwright` Python package; no browser is
ever downloaded). A page fails on:

* a request to any host other than 127.0.0.1 (a CDN leak: the book must work offline),
* a failed request or a response with status >= 400,
* a console message of type "error" or an uncaught JavaScript exception,
* a plotly figure (.plotly-graph-div / .js-plotly-plot) that drew no svg.main-svg,
* an <img> that did not load (naturalWidth 0) or that is shown with a 0x0 box,
* math that MathJax left untypeset, or an empty main content area.

A full-page screenshot of each page goes to _build/screenshots/<page>.png.
"""

from __future__ import annotations

import functools
import http.server
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
TOC = ROOT / "_toc.yml"

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
        yield f"http://{LOCAL_HOST}:{server.server_address[1]}"
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


def _check_page(browser, base_url: str, page_name: str) -> list[str]:
    """Load one page; return its problems (empty when it is fine)."""
    problems: list[str] = []
    external: list[str] = []

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
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / screenshot_name(page_name)), full_page=True)
    except Exception as exc:  # a timeout or a crash is a problem of this page, not the run
        problems.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        context.close()

    problems.extend(f"request to a non-local host (CDN leak?): {url}" for url in external)
    return list(dict.fromkeys(problems))


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


def test_every_page_renders_offline(site_url, browser):
    if not (HTML_DIR / "index.html").is_file():
        pytest.fail("site not built: run `make book` first", pytrace=False)
    pages = toc_pages()
    missing = [p for p in pages if not (HTML_DIR / f"{p}.html").is_file()]
    report = [f"{p}: page listed in _toc.yml but {p}.html was not built" for p in missing]
    for page_name in pages:
        if page_name in missing:
            continue
        report.extend(f"{page_name}: {problem}" for problem in _check_page(browser, site_url, page_name))
    assert not report, (
        f"{len(report)} problem(s) in the built site "
        f"(screenshots in {SCREENSHOT_DIR.relative_to(ROOT)}/):\n  " + "\n  ".join(report)
    )

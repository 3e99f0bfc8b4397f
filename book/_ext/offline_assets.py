"""Serve plotly.js from the installed ``plotly`` package, so the book works offline.

The workbench shows plotly figures as HTML made with
``fig.to_html(include_plotlyjs=False, full_html=False)``: a ``<div>`` and an inline
``<script>`` that calls ``Plotly.newPlot``. That script needs ``window.Plotly`` to
exist when it runs. This extension

* copies ``plotly/package_data/plotly.min.js`` (about 4.6 MB, never committed) into
  the output's ``_static/`` folder when an HTML builder starts, and
* adds ``<script src="_static/plotly.min.js">`` to the ``<head>`` of every page,
  without ``async``/``defer``, so it has run before any inline script in the body.

The copy comes from the same ``plotly`` that made the figures, so the JavaScript and
the figure JSON always have matching versions.

Three smaller helpers live here too:

* The workbench displays a figure as a bundle of ``application/vnd.plotly.v1+json``
  (for JupyterLab) and ``text/html`` (for the book). myst-nb renders the HTML and
  warns "skipping unknown output mime type" for the JSON, which would break
  ``--warningiserror`` builds; that one, expected, mime type is dropped silently.
  Any other unknown mime type still warns.
* ``book/_static/`` is added to the static path and ``workbench.css`` to every page
  (it labels saved ipywidgets outputs, which the offline book cannot run).
* Scripts that end up twice on a page are written once. sphinx-thebe registers its
  inline ``const THEBE_JS_URL = ...`` config twice under Jupyter Book, and the second
  copy throws "Identifier 'THEBE_JS_URL' has already been declared" on every page.

Registered in ``_config.yml`` under ``sphinx: local_extensions:``.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

PLOTLY_JS = "plotly.min.js"  # name of the file in the output's _static/
BOOK_STATIC = Path(__file__).resolve().parent.parent / "_static"  # book/_static
BOOK_CSS = "workbench.css"  # in book/_static
# Mime types shown by another entry of the same output bundle; myst-nb need not warn.
QUIET_MIME_TYPES = frozenset({"application/vnd.plotly.v1+json"})


def plotly_js_source() -> Path:
    """Path of ``plotly.min.js`` inside the installed ``plotly`` package."""
    try:
        import plotly
    except ImportError as exc:  # pragma: no cover - plotly is a hard dependency
        raise ExtensionError("offline_assets: the 'plotly' package is not installed") from exc
    src = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not src.is_file():
        raise ExtensionError(f"offline_assets: {src} not found (plotly {plotly.__version__})")
    return src


def copy_plotly_js(app: Sphinx) -> None:
    """Copy plotly.min.js into <outdir>/_static before pages are written.

    Copying this early (rather than at build-finished) lets Sphinx add its usual
    ``?v=<checksum>`` cache-buster to the script URL.
    """
    if app.builder.format != "html":
        return
    src = plotly_js_source()
    dest = Path(app.outdir) / "_static" / PLOTLY_JS
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
        return
    shutil.copyfile(src, dest)
    logger.info("offline_assets: copied %s -> %s", src, dest)


def quiet_known_mime_types() -> None:
    """Make myst-nb skip QUIET_MIME_TYPES without a warning (other types still warn)."""
    from myst_nb.core.render import NbElementRenderer

    for name in ("render_unhandled", "render_unhandled_inline"):
        original = getattr(NbElementRenderer, name)
        if getattr(original, "_offline_assets_quiet", False):
            continue  # already wrapped (Sphinx may load the extension twice)

        def wrapper(self, data, _original=original):
            if data.mime_type in QUIET_MIME_TYPES:
                return []
            return _original(self, data)

        wrapper._offline_assets_quiet = True
        setattr(NbElementRenderer, name, wrapper)


def add_book_static(app: Sphinx, config) -> None:
    """Serve book/_static/ (the book's own CSS) next to the theme's static files."""
    path = str(BOOK_STATIC)
    if BOOK_STATIC.is_dir() and path not in config.html_static_path:
        config.html_static_path.append(path)


def dedupe_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Drop exact duplicates (same src, same attributes, same body) from a page's scripts."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen = set()
    unique = []
    for js in scripts:
        # Inline scripts come with filename None or "" depending on how they were added.
        filename = str(getattr(js, "filename", js) or "")
        attributes = getattr(js, "attributes", {}) or {}
        key = (filename, tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key in seen:
            continue
        seen.add(key)
        unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    quiet_known_mime_types()
    app.connect("config-inited", add_book_static)
    app.add_css_file(BOOK_CSS)
    # Priority 200 (< 500, the default) puts plotly ahead of theme and extension
    # scripts. No loading_method: a plain, blocking <script> in <head>.
    app.add_js_file(PLOTLY_JS, priority=200)
    app.connect("builder-inited", copy_plotly_js)
    app.connect("html-page-context", dedupe_scripts)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}

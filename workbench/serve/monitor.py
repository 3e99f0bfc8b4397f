"""Watching the server: scrape ``/metrics`` ourselves, or run a real Prometheus on loopback and query it.

:class:`Prometheus` starts Debian's ``prometheus`` binary (when installed) with the scrape config
and alert rules of ``deploy/prometheus/``, pointed at one server, storing its data in a temporary
folder, and answers PromQL range queries. :class:`Scraper` is the fallback without Prometheus: it
reads ``/metrics`` every `interval` seconds and keeps the samples.

Example:
    >>> with Prometheus(server.url) as prom:
    ...     closed_loop(...)
    ...     series = prom.query_range('rate(workbench_http_requests_total[5s])', start=t0, end=time.time())
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import WorkbenchError
from .process import free_port

__all__ = ["bucket_quantile", "scrape", "Scraper", "Prometheus", "prometheus_binary", "watch", "dashboard", "PANELS", "DEPLOY_DIR",
           "RULES_FILE", "CONFIG_FILE"]

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
CONFIG_FILE = DEPLOY_DIR / "prometheus" / "prometheus.yml"
RULES_FILE = DEPLOY_DIR / "prometheus" / "alerts.yml"

# The chapter's dashboard: PromQL per panel (a short window: the notebook scrapes every second for
# seconds, where production would use [1m] or more) and the label that names each line.
_W = "[3s]"
PANELS: dict[str, tuple[str, str | None]] = {
    "requests per second (by status)":
        (f'sum by (status) (rate(workbench_http_requests_total{{route="/predict"}}{_W}))', "status"),
    "p99 latency of /predict (ms)":
        (f'1000 * histogram_quantile(0.99, sum by (le) (rate(workbench_http_request_duration_seconds_bucket'
         f'{{route="/predict"}}{_W})))', None),
    "rows per ONNX Runtime call": (f"rate(workbench_batch_size_sum{_W}) / rate(workbench_batch_size_count{_W})", None),
    "model version": ("max(workbench_model_version)", None),
    "drift: largest class-share gap": (
        f"max(abs(sum by (class) (rate(workbench_predictions_total{_W})) / ignoring (class) group_left "
        f"sum(rate(workbench_predictions_total{_W})) - on (class) max by (class) (workbench_reference_class_share)))",
        None),
}


def scrape(url: str, *, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read a ``/metrics`` page: ``{(sample name, sorted labels): value}``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url, timeout=timeout).text
    except httpx.HTTPError as exc:
        raise WorkbenchError(f"cannot read {url}: {exc}") from None
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Scraper:
    """Scrape ``/metrics`` every `interval` seconds on a background thread (what Prometheus would do)."""

    def __init__(self, metrics_url: str, *, interval: float = 0.5) -> None:
        self.url, self.interval = metrics_url, interval
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), scrape(self.url, timeout=2.0)))
            except WorkbenchError:
                pass
            self._stop.wait(self.interval)

    def start(self) -> "Scraper":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)
            self._thread.start()
        return self

    def wait_for_target(self, timeout: float = 15.0) -> "Scraper":
        """Wait for the first successful scrape."""
        deadline = time.monotonic() + timeout
        while not self.samples and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "Scraper":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def series(self, name: str, **labels: str) -> tuple[np.ndarray, np.ndarray]:
        """Times and summed values of one sample name over the scrapes (labels filter)."""
        t, v = [], []
        for ts, sample in self.samples:
            total = [val for (n, lab), val in sample.items()
                     if n == name and all(dict(lab).get(k) == w for k, w in labels.items())]
            if total:
                t.append(ts)
                v.append(sum(total))
        return np.array(t), np.array(v)

    def rate(self, name: str, **labels: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-second increase of a counter between scrapes."""
        t, v = self.series(name, **labels)
        if len(t) < 2:
            return np.zeros(0), np.zeros(0)
        return t[1:], np.diff(v) / np.diff(t)

    def panels(self, *, start: float = 0.0, end: float | None = None, lag: int = 2
               ) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The same panels as :data:`PANELS`, from the scrapes in [start, end] (differences over `lag` scrapes)."""
        snaps = [(t, smp) for t, smp in self.samples if t >= start and (end is None or t <= end)]
        out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in PANELS}
        names = list(PANELS)
        statuses = sorted({dict(lab)["status"] for _, smp in snaps for (n, lab) in smp
                           if n == "workbench_http_requests_total" and dict(lab).get("route") == "/predict"})
        series: dict[str, dict[str, list]] = {name: {} for name in PANELS}

        def total(smp: dict, name: str, **labels: str) -> float:
            return sum(v for (n, lab), v in smp.items() if n == name
                       and all(dict(lab).get(k) == w for k, w in labels.items()))

        for i in range(lag, len(snaps)):
            (t0, a), (t1, b) = snaps[i - lag], snaps[i]
            dt = t1 - t0
            for st in statuses:
                rate = (total(b, "workbench_http_requests_total", route="/predict", status=st)
                        - total(a, "workbench_http_requests_total", route="/predict", status=st)) / dt
                series[names[0]].setdefault(st, []).append((t1, rate))
            edges = sorted({float(dict(lab)["le"]) for (n, lab) in b
                            if n == "workbench_http_request_duration_seconds_bucket"})
            counts = np.array([total(b, "workbench_http_request_duration_seconds_bucket", route="/predict", le=_le(e))
                               - total(a, "workbench_http_request_duration_seconds_bucket", route="/predict",
                                       le=_le(e)) for e in edges])
            if len(counts) and counts[-1] > 0:
                series[names[1]].setdefault("", []).append((t1, 1000 * bucket_quantile(0.99, np.array(edges),
                                                                                         counts)))
            n_calls = total(b, "workbench_batch_size_count") - total(a, "workbench_batch_size_count")
            if n_calls > 0:
                rows = total(b, "workbench_batch_size_sum") - total(a, "workbench_batch_size_sum")
                series[names[2]].setdefault("", []).append((t1, rows / n_calls))
            series[names[3]].setdefault("", []).append((t1, total(b, "workbench_model_version")))
            preds = {dict(lab)["class"]: v - a.get((n, lab), 0.0) for (n, lab), v in b.items()
                     if n == "workbench_predictions_total"}
            ref = {dict(lab)["class"]: v for (n, lab), v in b.items() if n == "workbench_reference_class_share"}
            if sum(preds.values()) > 0 and ref:
                gap = max(abs(preds.get(c, 0.0) / sum(preds.values()) - share) for c, share in ref.items())
                series[names[4]].setdefault("", []).append((t1, gap))
        for name, lines in series.items():
            for label, pts in lines.items():
                arr = np.array(pts).reshape(-1, 2)
                out[name][label] = (arr[:, 0], arr[:, 1])
        return out

    def quantile(self, q: float, histogram: str, **labels: str) -> tuple[np.ndarray, np.ndarray]:
        """The `q` quantile of a histogram's observations between scrapes (as PromQL's histogram_quantile)."""
        times, values = [], []
        prev = None
        for ts, sample in self.samples:
            buckets: dict[float, float] = {}
            for (n, lab), val in sample.items():
                d = dict(lab)
                if n == histogram + "_bucket" and all(d.get(k) == w for k, w in labels.items()):
                    le = float(d["le"])
                    buckets[le] = buckets.get(le, 0.0) + val
            if prev is not None and buckets:
                edges = sorted(buckets)
                counts = np.array([buckets[e] - prev.get(e, 0.0) for e in edges])
                if counts[-1] > 0:
                    times.append(ts)
                    values.append(bucket_quantile(q, np.array(edges), counts))
            prev = buckets
        return np.array(times), np.array(values)


def _le(edge: float) -> str:
    """How prometheus_client writes a bucket bound in the `le` label."""
    return "+Inf" if edge == float("inf") else repr(float(edge))


def bucket_quantile(q: float, edges: np.ndarray, cumulative: np.ndarray) -> float:
    """Linear interpolation inside the bucket holding the quantile (Prometheus' rule)."""
    rank = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, rank))
    if i >= len(edges) - 1:  # in the +Inf bucket: the largest finite edge
        return float(edges[-2]) if len(edges) > 1 else float("nan")
    lo_edge = edges[i - 1] if i > 0 else 0.0
    lo_count = cumulative[i - 1] if i > 0 else 0.0
    width = cumulative[i] - lo_count
    return float(lo_edge + (edges[i] - lo_edge) * ((rank - lo_count) / width if width > 0 else 1.0))


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable: $WORKBENCH_PROMETHEUS (a path; ``off`` for none), else on PATH, else None."""
    import os

    setting = os.environ.get("WORKBENCH_PROMETHEUS")
    if setting is not None:
        return None if setting.lower() in ("", "0", "off", "no", "false") else setting
    return shutil.which("prometheus")


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping one server every `interval` seconds, with the book's alert rules.

    Args:
        target_url: the server's base URL (``http://127.0.0.1:PORT``).
        interval: scrape and rule evaluation interval, seconds.
        binary: the executable (default: ``prometheus`` on PATH).
    """

    def __init__(self, target_url: str, *, interval: float = 1.0, binary: str | None = None) -> None:
        self.binary = binary or prometheus_binary()
        if self.binary is None:
            raise WorkbenchError("Prometheus is not installed (Debian: apt-get install prometheus); "
                                 "use workbench.serve.monitor.Scraper instead")
        parts = urlsplit(target_url)
        self.target = f"{parts.hostname}:{parts.port}"
        self.interval = interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def config_text(self) -> str:
        """deploy/prometheus/prometheus.yml with this run's target, interval and rules file."""
        import yaml

        cfg = yaml.safe_load(CONFIG_FILE.read_text())
        cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = f"{int(self.interval * 1000)}ms"
        cfg["rule_files"] = [str(RULES_FILE)]
        for job in cfg["scrape_configs"]:
            job["static_configs"] = [{"targets": [self.target]}]
        return yaml.safe_dump(cfg, sort_keys=False)

    def start(self) -> "Prometheus":
        import httpx

        self._dir = tempfile.TemporaryDirectory(prefix="workbench-prometheus-")
        folder = Path(self._dir.name)
        (folder / "prometheus.yml").write_text(self.config_text())
        log = open(folder / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (folder / "prometheus.log").read_text().strip().splitlines()[-2:]
                self.stop()
                raise WorkbenchError(f"prometheus exited with status {self.proc.returncode}: {' | '.join(tail)}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise WorkbenchError("prometheus did not become ready within 30 s")

    def wait_for_target(self, timeout: float = 15.0) -> "Prometheus":
        """Wait until the server has been scraped (Prometheus hands new targets to its scrapers only every
        5 s, so the first scrape comes some seconds after start: start it early)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.targets_up():
                return self
            time.sleep(0.2)
        raise WorkbenchError(f"prometheus has not scraped {self.target} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _get(self, path: str, params: dict) -> Any:
        import httpx

        r = httpx.get(self.url + path, params=params, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise WorkbenchError(f"prometheus query failed: {body.get('error', r.text[:200])}")
        return body["data"]

    def query_range(self, expr: str, *, start: float, end: float, step: float | None = None
                    ) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """PromQL over [start, end] (unix seconds): a list of (labels, times, values), one per series."""
        data = self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end,
                                                 "step": step or self.interval})
        return [(r["metric"], np.array([float(t) for t, _ in r["values"]]),
                 np.array([float(v) for _, v in r["values"]])) for r in data["result"]]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """An instant PromQL query: (labels, value) per series."""
        return [(r["metric"], float(r["value"][1])) for r in self._get("/api/v1/query", {"query": expr})["result"]]

    def panels(self, *, start: float, end: float | None = None) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Every :data:`PANELS` query over [start, end (now)]: ``{panel: {line label: (times, values)}}``."""
        end = time.time() if end is None else end
        out = {}
        for name, (expr, label) in PANELS.items():
            out[name] = {(m.get(label, "") if label else ""): (t, v)
                         for m, t, v in self.query_range(expr, start=start, end=end)}
        return out

    def targets_up(self) -> bool:
        return any(t.get("health") == "up" for t in self._get("/api/v1/targets", {})["activeTargets"])

    def alerts(self) -> list[dict]:
        """Alerts pending or firing now."""
        return self._get("/api/v1/alerts", {})["alerts"]


def watch(server_url: str, *, interval: float = 1.0) -> Prometheus | Scraper:
    """A real Prometheus scraping the server when the binary is installed, else a :class:`Scraper`.

    Both are context managers with ``panels(...)``; ``isinstance(w, Prometheus)`` tells which one runs.
    """
    if prometheus_binary() is not None:
        return Prometheus(server_url, interval=interval)
    return Scraper(server_url.rstrip("/") + "/metrics", interval=interval / 2)


def dashboard(panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], *, t0: float,
              marks: dict[str, float] | None = None, title: str = "") -> Any:
    """Stacked time series, one row per panel, seconds since `t0` on a shared axis; `marks` draw vertical lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(panels)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=names, vertical_spacing=0.06)
    for row, name in enumerate(names, start=1):
        for label, (t, v) in sorted(panels[name].items()):
            ok = np.isfinite(v)
            fig.add_trace(go.Scatter(x=(np.asarray(t) - t0)[ok], y=np.asarray(v)[ok], mode="lines+markers",
                                     name=f"{label}" if label else name, showlegend=bool(label),
                                     marker=dict(size=4)), row=row, col=1)
    for text, at in (marks or {}).items():
        fig.add_vline(x=at - t0, line_dash="dash", line_color="gray")
        fig.add_annotation(x=at - t0, y=1.0, yref="paper", text=text, showarrow=False, yanchor="bottom")
    fig.update_layout(height=190 * len(names), title=title, legend=dict(orientation="h", y=-0.08),
                      margin=dict(t=70))
    fig.update_xaxes(title_text="seconds", row=len(names), col=1)
    return fig

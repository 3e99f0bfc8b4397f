"""Run the server in a child process on loopback (for notebooks, tests and the benchmark) and stop it cleanly.

Example:
    >>> with ServerProcess("digits-mlp@champion", registry_uri=reg.uri) as server:
    ...     httpx.post(server.url + "/predict", json={"inputs": x})
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError
from .app import DEFAULT_HOST, ROUTES, ServeSettings

__all__ = ["ServerProcess", "free_port"]

_RUNNING: set["ServerProcess"] = set()


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


atexit.register(_stop_all)


class ServerProcess:
    """``python -m workbench.serve serve ...`` in a child process bound to 127.0.0.1.

    Args:
        model: ``NAME@ALIAS``, ``NAME/VERSION`` or an ``.onnx`` path.
        registry_uri: the registry to resolve `model` in (default: the workbench's default registry).
        settings: batching, limits, API key, polling (:class:`~workbench.serve.app.ServeSettings`).
        port: default a free port.
        start_timeout: seconds to wait for ``/health`` to answer 200.
    """

    def __init__(self, model: str | os.PathLike, *, registry_uri: str | None = None,
                 settings: ServeSettings | None = None, port: int | None = None, start_timeout: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        self.model, self.registry_uri = str(model), registry_uri
        self.settings = settings or ServeSettings()
        self.port = port or free_port()
        self.url = f"http://{DEFAULT_HOST}:{self.port}"
        self.start_timeout, self.env = start_timeout, env
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "workbench.serve", "serve", "--model", self.model, "--host", DEFAULT_HOST,
               "--port", str(self.port), "--max-batch", str(s.max_batch), "--max-wait-ms", str(s.max_wait_ms),
               "--max-rows", str(s.max_rows), "--max-body-bytes", str(s.max_body_bytes),
               "--poll-seconds", str(s.poll_seconds), "--threads", str(s.threads),
               "--body-timeout-s", str(s.body_timeout_s)]
        if self.registry_uri:
            cmd += ["--registry", self.registry_uri]
        return cmd

    def start(self, *, wait: bool = True) -> "ServerProcess":
        """Start the child; with ``wait=False`` return at once (call :meth:`wait_ready` later)."""
        fd, log = tempfile.mkstemp(prefix="workbench-serve-", suffix=".log")
        self.log_path = Path(log)
        env = {**os.environ, **(self.env or {})}
        if self.settings.api_key:
            env["WORKBENCH_API_KEY"] = self.settings.api_key  # not on the command line, where `ps` shows it
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        _RUNNING.add(self)
        self._started = time.monotonic()
        return self.wait_ready() if wait else self

    def wait_ready(self) -> "ServerProcess":
        """Wait until ``/health`` answers 200; raise with the server's last words if it exits or times out."""
        import httpx

        deadline = self._started + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise WorkbenchError(f"the server exited with status {self.proc.returncode} before it was ready: "
                                     f"{tail}")
            try:
                if httpx.get(self.url + ROUTES["ready"], timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise WorkbenchError(f"the server did not become ready within {self.start_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        """The last lines the server printed (its log file)."""
        try:
            text = self.log_path.read_text().strip().splitlines() if self.log_path else []
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn finishes in-flight requests), then SIGKILL after `timeout` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _RUNNING.discard(self)
        if self.log_path is not None and self.proc is not None and self.proc.returncode in (0, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __hash__(self) -> int:
        return id(self)

"""The live dashboard server: the standard library's ``ThreadingHTTPServer`` on 127.0.0.1.

Three routes: ``/`` (the page), ``/static/dashboard.js`` (shipped with the package) and
``/api/run`` (the JSON of :func:`summarize_run`, recomputed at most once per
``refresh_s`` seconds; the page polls it). A dashboard has one reader, an SRE's browser, so
a framework would add nothing but a dependency.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from step_infra.telemetry.dashboard.data import summarize_run
from step_infra.telemetry.store import StoreTail

log = logging.getLogger(__name__)


def static_text(name: str) -> str:
    """A file shipped in ``step_infra/telemetry/dashboard/static``."""
    return (resources.files("step_infra.telemetry.dashboard") / "static" / name).read_text()


class _Cache:
    """The summary JSON, rebuilt at most every ``refresh_s``; the store is read incrementally
    (only parts written since the last refresh), so a long run does not re-read everything."""

    def __init__(self, run_dir: Path, refresh_s: float) -> None:
        self.run_dir = run_dir
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._body = b""
        self._tail = StoreTail(run_dir)
        self._rows: pd.DataFrame | None = None

    def get(self) -> bytes:
        with self._lock:
            if not self._body or time.monotonic() - self._at >= self.refresh_s:
                new = self._tail.poll()
                if self._rows is None or self._rows.empty:
                    self._rows = new
                elif not new.empty:
                    self._rows = pd.concat([self._rows, new], ignore_index=True)
                summary = summarize_run(self.run_dir, rows=self._rows)
                self._body = json.dumps(summary).encode()
                self._at = time.monotonic()
            return self._body


class DashboardServer:
    """Serve the dashboard of ``run_dir``; ``with DashboardServer(...) as s: s.url``."""

    def __init__(
        self, run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, refresh_s: float = 1.0
    ) -> None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ValueError(
                f"run directory {str(run_dir)!r} does not exist (expected runs/<name>)"
            )
        cache = _Cache(run_dir, refresh_s)
        page = static_text("index.html").replace("__RUN__", run_dir.name).encode()
        script = static_text("dashboard.js").encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(page, "text/html; charset=utf-8")
                elif path == "/static/dashboard.js":
                    self._send(script, "application/javascript")
                elif path == "/api/run":
                    try:
                        self._send(cache.get(), "application/json")
                    except Exception as exc:
                        log.exception("summarizing %s failed", run_dir)
                        self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("dashboard: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_dashboard(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    duration_s: float | None = None,
) -> None:
    """Serve until interrupted (or for ``duration_s`` seconds)."""
    with DashboardServer(run_dir, host=host, port=port) as server:
        log.info("dashboard of %s at %s", run_dir, server.url)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

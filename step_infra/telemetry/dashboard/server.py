"""The live dashboard server: the standard library's ``ThreadingHTTPServer`` on 127.0.0.1.

Routes: ``/`` (the page), ``/static/dashboard.js``, and the JSON API, all aggregated here so
the browser only ever gets small documents (see ``data.py``):

* ``/api/run[?top=N]``: the main document (node heatmap, top-N slowest ranks, sections,
  charts, the would-evict panel, events);
* ``/api/node?name=NODE``: the drill-down to one node's ranks;
* ``/api/event?i=N``: one event of events.jsonl in full (large evidence is left out of
  ``/api/run``).

Documents are cached per store signature (the store directory's mtime) and events file
(mtime, size): a poll that finds nothing new costs two ``stat`` calls. When something
changed, one rebuild runs on a background thread (reading only the parts written since the
last one) while the previous documents keep being served, at most every
``max(refresh_s, 2 x the last build time)``; only the very first request waits for a build,
and :meth:`DashboardServer.start` begins that one at once. Bodies go out gzip-compressed when
the browser accepts it. A dashboard has one reader, an SRE's browser, so a framework would
add nothing but a dependency.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from step_infra.telemetry.dashboard.aggregate import RunModel, StoreAggregator
from step_infra.telemetry.dashboard.data import TOP_N, node_doc, summary_doc
from step_infra.telemetry.events import events_path, read_events
from step_infra.telemetry.store import store_signature

log = logging.getLogger(__name__)


def static_text(name: str) -> str:
    """A file shipped in ``step_infra/telemetry/dashboard/static``."""
    return (resources.files("step_infra.telemetry.dashboard") / "static" / name).read_text()


@dataclass(slots=True)
class _Snapshot:
    """One build: the model, the events, and the documents cut from them so far."""

    signature: tuple[int, int, int]
    model: RunModel
    events: list[dict[str, Any]]
    built_at: float  # time.monotonic()
    build_s: float
    docs: dict[tuple[str, str], bytes] = field(default_factory=dict)


class _RunCache:
    """The run's aggregate and documents; see the module docstring for when it rebuilds."""

    def __init__(self, run_dir: Path, refresh_s: float, straggler_threshold: float) -> None:
        self.run_dir = run_dir
        self.refresh_s = refresh_s
        self.straggler_threshold = straggler_threshold
        self._agg = StoreAggregator(str(run_dir))
        self._snapshot: _Snapshot | None = None
        self._build_lock = threading.Lock()  # one build at a time
        self._rebuilding = threading.Event()
        self.ready = threading.Event()  # set once the first build is done

    def signature(self) -> tuple[int, int, int]:
        try:
            st = events_path(self.run_dir).stat()
            ev = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            ev = (0, 0)
        return (store_signature(self.run_dir), *ev)

    def _build(self) -> _Snapshot:
        with self._build_lock:
            signature = self.signature()  # before reading: a part added meanwhile rebuilds
            if self._snapshot is not None and self._snapshot.signature == signature:
                return self._snapshot  # another thread built this very state meanwhile
            t0 = time.perf_counter()
            self._agg.refresh()
            model = self._agg.model()
            events = read_events(self.run_dir)
            snap = _Snapshot(signature, model, events, time.monotonic(), time.perf_counter() - t0)
            self._snapshot = snap
            self.ready.set()
            log.debug("dashboard of %s rebuilt in %.2f s", self.run_dir, snap.build_s)
            return snap

    def _rebuild_in_background(self) -> None:
        try:
            self._build()
        except Exception:
            log.exception("rebuilding the dashboard of %s failed", self.run_dir)
        finally:
            self._rebuilding.clear()

    def warm(self) -> None:
        """Start the first build now, on a background thread."""
        self._rebuilding.set()
        threading.Thread(target=self._rebuild_in_background, daemon=True).start()

    def snapshot(self) -> _Snapshot:
        snap = self._snapshot
        if snap is None:
            return self._build()
        due = time.monotonic() - snap.built_at >= max(self.refresh_s, 2 * snap.build_s)
        if due and not self._rebuilding.is_set() and self.signature() != snap.signature:
            self._rebuilding.set()
            threading.Thread(target=self._rebuild_in_background, daemon=True).start()
        return snap

    def document(self, route: str, query: dict[str, list[str]]) -> bytes | None:
        """The JSON body of ``route`` (None: no such thing), cut once per snapshot."""
        snap = self.snapshot()
        key = (route, json.dumps(query, sort_keys=True))
        body = snap.docs.get(key)
        if body is None:
            doc = self._cut(snap, route, query)
            if doc is None:
                return None
            body = json.dumps(doc, separators=(",", ":")).encode()
            if len(snap.docs) < 4096:
                snap.docs[key] = body
        return body

    def _cut(self, snap: _Snapshot, route: str, query: dict[str, list[str]]) -> Any:
        if route == "/api/run":
            top = _int(query, "top", TOP_N)
            doc = summary_doc(
                snap.model,
                snap.events,
                run=self.run_dir.name,
                top_n=max(1, min(top, 1000)),
                straggler_threshold=self.straggler_threshold,
            )
            doc["build_s"] = round(snap.build_s, 3)
            return doc
        if route == "/api/node":
            name = query.get("name", [""])[0]
            return node_doc(
                snap.model, snap.events, name, straggler_threshold=self.straggler_threshold
            )
        if route == "/api/event":
            i = _int(query, "i", -1)
            return snap.events[i] if 0 <= i < len(snap.events) else None
        return None


def _int(query: dict[str, list[str]], key: str, default: int) -> int:
    try:
        return int(query.get(key, [str(default)])[0])
    except ValueError:
        return default


class DashboardServer:
    """Serve the dashboard of ``run_dir``; ``with DashboardServer(...) as s: s.url``."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        refresh_s: float = 1.0,
        straggler_threshold: float = 0.1,
    ) -> None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ValueError(
                f"run directory {str(run_dir)!r} does not exist (expected runs/<name>)"
            )
        self.cache = cache = _RunCache(run_dir, refresh_s, straggler_threshold)
        page = static_text("index.html").replace("__RUN__", run_dir.name).encode()
        script = static_text("dashboard.js").encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path in ("/", "/index.html"):
                    self._send(page, "text/html; charset=utf-8")
                elif url.path == "/static/dashboard.js":
                    self._send(script, "application/javascript")
                elif url.path.startswith("/api/"):
                    try:
                        body = cache.document(url.path, parse_qs(url.query))
                    except Exception as exc:
                        log.exception("dashboard %s of %s failed", url.path, run_dir)
                        self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
                        return
                    if body is None:
                        self.send_error(HTTPStatus.NOT_FOUND, f"nothing at {self.path}")
                    else:
                        self._send(body, "application/json")
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)

            def _send(self, body: bytes, content_type: str) -> None:
                gz = "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024
                if gz:
                    body = gzip.compress(body, compresslevel=5)
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", content_type)
                if gz:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("dashboard: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._httpd.timeout = 10
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the first aggregation is done (the first page load is then served from
        the cache); False if it is not done within ``timeout_s``."""
        return self.cache.ready.wait(timeout_s)

    def start(self) -> DashboardServer:
        self.cache.warm()
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

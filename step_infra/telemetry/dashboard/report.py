"""A static, self-contained HTML report of a run: the dashboard page with its data inlined.

The same page and script as the live dashboard, so the report and the live view never
disagree; the JSON is embedded instead of fetched, and the script is inlined, so the file
opens anywhere without a server or network. Events keep their full evidence (there is no
server to fetch it from later), and the node drill-downs are embedded for runs of up to
:data:`REPORT_NODES_MAX` nodes (beyond that the report would weigh megabytes; the live
dashboard serves them on demand).
"""

from __future__ import annotations

import json
from pathlib import Path

from step_infra.telemetry.dashboard.aggregate import StoreAggregator
from step_infra.telemetry.dashboard.data import node_doc, summary_doc
from step_infra.telemetry.dashboard.server import static_text
from step_infra.telemetry.events import read_events

REPORT_NODES_MAX = 64


def _inline(value: object) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def render_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (or ``out_path``) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist (expected runs/<name>)")
    out = Path(out_path) if out_path is not None else run_dir / "report.html"
    agg = StoreAggregator(str(run_dir))
    agg.refresh()
    model = agg.model()
    events = read_events(run_dir)
    data = summary_doc(model, events, run=run_dir.name, full_evidence=True)
    nodes = {}
    if data["heatmap"]["level"] == "node" and len(model.nodes) <= REPORT_NODES_MAX:
        nodes = {name: node_doc(model, events, name) for name in model.nodes}
    script = static_text("dashboard.js").replace("</", "<\\/")
    page = static_text("index.html").replace("__RUN__", run_dir.name)
    page = page.replace(
        '<script src="static/dashboard.js"></script>',
        f"<script>window.STEP_INFRA_DATA = {_inline(data)};\n"
        f"window.STEP_INFRA_NODES = {_inline(nodes)};</script>\n<script>{script}</script>",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out

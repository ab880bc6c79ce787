"""A static, self-contained HTML report of a run: the dashboard page with its data inlined.

The same page and script as the live dashboard, so the report and the live view never
disagree; the JSON is embedded instead of fetched, and the script is inlined, so the file
opens anywhere without a server or network.
"""

from __future__ import annotations

import json
from pathlib import Path

from step_infra.telemetry.dashboard.data import summarize_run
from step_infra.telemetry.dashboard.server import static_text


def render_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (or ``out_path``) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist (expected runs/<name>)")
    out = Path(out_path) if out_path is not None else run_dir / "report.html"
    data = json.dumps(summarize_run(run_dir)).replace("</", "<\\/")
    script = static_text("dashboard.js").replace("</", "<\\/")
    page = static_text("index.html").replace("__RUN__", run_dir.name)
    page = page.replace(
        '<script src="static/dashboard.js"></script>',
        f"<script>window.STEP_INFRA_DATA = {data};</script>\n<script>{script}</script>",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out

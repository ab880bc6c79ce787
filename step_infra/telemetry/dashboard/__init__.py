"""The StepTelemetry dashboard: a live page served from the run directory, and a static report.

:func:`summarize_run` turns ``telemetry.parquet`` + ``events.jsonl`` into one JSON document;
the page (``static/``, plain JavaScript shipped in the package, no CDN) draws it. The server
is the standard library's ``http.server``: one page, one JSON endpoint, nothing to install.
"""

from __future__ import annotations

from step_infra.telemetry.dashboard.data import summarize_run
from step_infra.telemetry.dashboard.report import render_report
from step_infra.telemetry.dashboard.server import DashboardServer, serve_dashboard

__all__ = ["DashboardServer", "render_report", "serve_dashboard", "summarize_run"]

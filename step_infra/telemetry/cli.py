"""``step-infra dashboard``: the StepTelemetry sub-command.

This module is imported when the CLI starts, so it imports only typer, rich and the standard
library; the dashboard itself (pandas, pyarrow) loads inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from step_infra.console import make_console


def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="The run directory, e.g. runs/<name>.")],
    port: Annotated[int, typer.Option(help="Port to serve on (0 = any free port).")] = 8050,
    host: Annotated[str, typer.Option(help="Address to bind; keep loopback.")] = "127.0.0.1",
    report: Annotated[
        Path | None, typer.Option(help="Write a static HTML report to this path and exit.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop serving after this many seconds (default: Ctrl-C).")
    ] = None,
) -> None:
    """Serve a live telemetry dashboard of a run (per-rank heatmap, sections, data stalls,
    throughput/MFU, loss, events with evidence), or render a static report with --report."""
    import logging

    from step_infra.telemetry.dashboard import DashboardServer, render_report

    console = make_console()
    if not run_dir.is_dir():
        console.print(f"[red]run directory {run_dir} does not exist[/] (expected runs/<name>)")
        raise typer.Exit(2)
    if report is not None:
        out = render_report(run_dir, report)
        console.print(f"report written to [bold]{out}[/]")
        return
    logging.basicConfig(level=logging.WARNING)
    import time

    with DashboardServer(run_dir, host=host, port=port) as server:
        console.print(f"dashboard of [bold]{run_dir}[/] at [bold]{server.url}[/] (Ctrl-C stops)")
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

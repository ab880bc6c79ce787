"""``step-infra dashboard``: the StepTelemetry sub-command.

This module is imported when the CLI starts, so it imports only typer, rich and the standard
library; the dashboard itself (pandas, pyarrow) loads inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


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

    console = Console()
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


def telemetry_demo(
    run_dir: Annotated[Path, typer.Option(help="Where the run writes.")] = Path(
        "runs/telemetry-demo"
    ),
    steps: Annotated[int, typer.Option(help="Training steps of the tiny job.")] = 60,
    slow_at: Annotated[int, typer.Option(help="Step at which node1 becomes slow.")] = 15,
    factor: Annotated[float, typer.Option(help="How much slower node1 becomes.")] = 1.3,
    eviction: Annotated[str, typer.Option(help="'evict' or 'detect'.")] = "evict",
    spares: Annotated[int, typer.Option(help="Hot-spare agents waiting to join.")] = 1,
    min_nodes: Annotated[
        int, typer.Option(help="Smallest job size (below 3: an eviction may shrink the job).")
    ] = 3,
) -> None:
    """Run a tiny elastic job (3 torchrun agents + hot spares, gloo) with one node made slow:
    watch it get detected, evicted and replaced (or the job shrink, with --spares 0
    --min-nodes 2), then read the story and the report."""
    import shutil

    from step_infra.telemetry.dashboard import render_report
    from step_infra.telemetry.elastic import TOY_WORKER, ElasticConfig, run_elastic_job
    from step_infra.telemetry.events import read_events

    console = Console()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = ElasticConfig(
        run_dir=run_dir,
        worker_args=(*TOY_WORKER, "--steps", str(steps), "--compute-s", "0.1"),
        policy=eviction,
        spares=spares,
        min_nodes=min_nodes,
        slow=f"node1:{slow_at}:{factor}",
    )
    console.print(
        f"3 agents + {spares} spare(s); node1 becomes {factor}x slower at step {slow_at} ..."
    )
    result = run_elastic_job(cfg)
    for ev in read_events(run_dir):
        if ev["source"] == "controller" and ev["event"] != "agent_start":
            detail = {k: v for k, v in ev.items() if k not in ("t_unix_s", "source", "evidence")}
            console.print(f"  [bold]{ev['event']:<10}[/] {detail}")
    report = render_report(run_dir)
    colour = "green" if result.ok else "red"
    console.print(
        f"[{colour}]{result.reason}[/]: evicted {result.evicted}, joined {result.joined}, "
        f"detection -> first resumed step {result.detection_to_resume_s} s, wall {result.wall_s} s"
    )
    console.print(f"report: [bold]{report}[/]; live view: step-infra dashboard {run_dir}")
    if not result.ok:
        raise typer.Exit(1)

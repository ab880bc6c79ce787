"""``step-infra train``: run (or resume) a streaming, fault-tolerant training job.

Imports only typer and rich at module level; the job's machinery loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from step_infra.console import make_console


def train(
    recipe: str = typer.Option(
        "tiny-t2v",
        help="Training recipe: tiny-t2v, micro-t2v, or gpu-t2v (NCCL, one rank per GPU).",
    ),
    plan: Annotated[
        Path | None,
        typer.Option(help="Strategy TOML from `step-infra plan` (layout, batch, encoder split)."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/<recipe>).")
    ] = None,
    fresh: bool = typer.Option(
        False, help="Delete the run directory first instead of resuming from its checkpoint."
    ),
    steps: int | None = typer.Option(None, help="Override the recipe's number of steps."),
    nodes: int | None = typer.Option(
        None, help="Trainer nodes (default: the recipe's; a plan's tp*pp*cp*dp must fit)."
    ),
    host: str = typer.Option(
        "127.0.0.1",
        help="Address the registry, encoder servers and rendezvous bind and advertise "
        "(this host's routable address when other hosts take part).",
    ),
    nproc_per_node: int | None = typer.Option(
        None, help="Trainer ranks per node (default: the recipe's; a multiple of tp)."
    ),
    faults: bool = typer.Option(
        True, help="Inject the recipe's faults (a slowed node, a kill -9) to show recovery."
    ),
    auto_split: bool = typer.Option(
        True,
        help="Size the encoder servers from the emulator's predicted step time "
        "(ignored when --plan gives an \\[allocation] table).",
    ),
    registry: str | None = typer.Option(
        None,
        help="Join this running registry (host:port; token from STEP_TOKEN) instead of "
        "starting one.",
    ),
    eviction: str = typer.Option(
        "evict",
        help="'evict': evict a straggler when the time it saves exceeds the restart's cost; "
        "'detect': a dry run that only logs what it would have evicted, and when.",
    ),
    metrics_port: int | None = typer.Option(
        None,
        help="Serve the controller's straggler scores for Prometheus on 127.0.0.1:PORT "
        "(step_infra_straggler_score; see step_infra/telemetry/grafana).",
    ),
    timeout_s: float = typer.Option(900.0, help="Give up on the job after this long."),
) -> None:
    """Start the registry, encoder servers and elastic DiT trainers; write report.html."""
    import dataclasses

    from step_infra.emulator.plan import Plan
    from step_infra.train.job.config import Faults, apply_plan, get_recipe
    from step_infra.train.job.launcher import run_training_job
    from step_infra.train.job.progress import JobProgressPrinter

    console = make_console()
    try:
        cfg = get_recipe(recipe)
        if steps is not None:
            cfg = cfg.replace(steps=steps)
        if not faults:
            cfg = cfg.replace(faults=Faults())
        elastic = dataclasses.replace(cfg.elastic, policy=eviction, metrics_port=metrics_port)
        if nodes is not None:
            elastic = dataclasses.replace(elastic, nodes=nodes)
        if nproc_per_node is not None:
            elastic = dataclasses.replace(elastic, nproc_per_node=nproc_per_node)
        elastic = dataclasses.replace(elastic, host=host)
        cfg = cfg.replace(elastic=elastic, servers=dataclasses.replace(cfg.servers, host=host))
        loaded = Plan.load(plan) if plan is not None else None
        if loaded is not None:
            cfg = apply_plan(cfg, loaded)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    out = run_dir or Path("runs") / cfg.name
    result = run_training_job(
        cfg,
        out,
        on_event=JobProgressPrinter(console, out),
        fresh=fresh,
        job_timeout_s=timeout_s,
        auto_split=auto_split and (loaded is None or loaded.allocation is None),
        registry=registry,
    )
    if result.report is not None:
        console.print(f"report: [bold]{result.report}[/]; live view: step-infra dashboard {out}")
    if not result.ok:
        console.print(f"resume with the same command (it continues from {out}/checkpoints)")
        raise typer.Exit(1)

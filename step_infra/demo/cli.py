"""``step-infra telemetry-demo``: the eviction story of the elastic controller on a toy job.

Imported when the CLI starts, so it imports only typer and the console; the controller and
the toy job load inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from step_infra.console import make_console


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
    from step_infra.demo.story import run_eviction_story

    result, _ = run_eviction_story(
        run_dir,
        console=make_console(),
        steps=steps,
        slow_at=slow_at,
        factor=factor,
        eviction=eviction,
        spares=spares,
        min_nodes=min_nodes,
    )
    if not result.ok:
        raise typer.Exit(1)

"""``step-infra calibrate``: measure this machine into a hardware profile the planner loads.

Kept apart from the library (``hwprobe``) so that the CLI imports only typer/rich at
start-up; torch is imported inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from step_infra.console import make_console


def calibrate(
    out: Annotated[
        Path, typer.Option(help="Profile JSON to write (ClusterSpec.from_profile reads it).")
    ] = Path("runs/hardware_profile.json"),
    full: Annotated[
        bool, typer.Option(help="Larger shapes and more repeats (slower than the quick default).")
    ] = False,
    ranks: Annotated[
        int, typer.Option(help="Ranks that will share this machine (rates measured concurrently).")
    ] = 1,
    gloo: Annotated[bool, typer.Option(help="Also time a 2-process gloo all-reduce.")] = True,
    name: Annotated[str, typer.Option(help="Name recorded in the profile.")] = "local-cpu",
) -> None:
    """Measure matmul and attention rates by shape, memory bandwidth and loopback bandwidth,
    and write a hardware profile (`step-infra plan --profile PATH` uses it)."""
    from step_infra.emulator.hwprobe import ProbeConfig, quick_config
    from step_infra.emulator.hwprobe import calibrate as run_calibrate

    console = make_console()
    if ranks < 1:
        console.print(f"[red]error:[/] --ranks must be >= 1, got {ranks}")
        raise typer.Exit(2)
    cfg = ProbeConfig(gloo=gloo) if full else quick_config(gloo=gloo)
    with console.status("measuring this machine..."):
        profile = run_calibrate(out, cfg=cfg, name=name, ranks_per_node=ranks)
    table = Table(title=f"hardware profile {out}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for section in ("gpu", "cluster"):
        for key, value in sorted(profile.get(section, {}).items()):
            if key != "source":
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                table.add_row(f"{section}.{key}", shown)
    console.print(table)
    probe_s = profile.get("measurements", {}).get("probe_s")
    if probe_s is not None:
        console.print(f"measured in {probe_s:.1f} s; written to [bold]{out}[/]")

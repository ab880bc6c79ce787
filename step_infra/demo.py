"""``step-infra demo``: the main job end to end on embedded defaults.

It runs every stage that exists so far, in the order the real job uses them, and writes
each stage's output into the run directory so a newcomer can see what happened.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console

from step_infra.doctor import probe_environment


def run_demo(run_dir: str | Path, *, console: Console) -> Path:
    """Run the demo stages into ``run_dir`` and return the path of its summary file."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    console.rule("1. environment")
    probes = probe_environment()
    for probe in probes:
        mark = "ok" if probe.ok else ("MISSING" if probe.required else "absent")
        console.print(f"  {probe.name:<20} {mark:<8} {probe.detail}")
    env_path = out / "environment.json"
    env_path.write_text(json.dumps([dataclasses.asdict(p) for p in probes], indent=2))

    outputs: dict[str, str] = {"environment": str(env_path)}
    summary = {
        "stages": list(outputs),
        "outputs": outputs,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    console.rule("done")
    console.print(f"outputs written to [bold]{out.resolve()}[/]")
    for stage, path in outputs.items():
        console.print(f"  {stage:<14} {path}")
    return summary_path

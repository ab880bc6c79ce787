"""``step-infra demo``: the main job end to end on embedded defaults.

Runs every stage that exists, in the order the real job uses them, each writing into its own
folder of the run directory, and ends with a summary of where everything went. A failed stage
stops the demo with a non-zero exit, so `make demo` never reports success it did not have.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from step_infra.doctor import probe_environment

Stage = Callable[[Path, Console], dict[str, str]]


class DemoStageError(RuntimeError):
    """A demo stage ran but did not reach its goal."""


def stage_environment(out: Path, console: Console) -> dict[str, str]:
    """Probe the stack: what this machine can run."""
    probes = probe_environment()
    for probe in probes:
        mark = "ok" if probe.ok else ("MISSING" if probe.required else "absent")
        console.print(f"  {probe.name:<20} {mark:<8} {probe.detail}")
    path = out / "environment.json"
    path.write_text(json.dumps([dataclasses.asdict(p) for p in probes], indent=2))
    return {"environment": str(path)}


def stage_plan(out: Path, console: Console) -> dict[str, str]:
    """Step Emulator: plan the Step-Video 30B run on 2,048 H100s (204x544x992 clips), and the
    demo's tiny DiT on this machine's measured profile."""
    from step_infra.emulator import cluster_for, get_model
    from step_infra.emulator.cli import print_plan
    from step_infra.emulator.planner import make_plan, plot_plan, write_plan
    from step_infra.emulator.specs import ClusterSpec

    plan_dir = out / "plan"
    model = get_model("stepvideo-t2v-30b").with_video(204, 544, 992)
    big = make_plan(model, cluster_for("h100-sxm", 2048), global_batch=256)
    print_plan(big, console, top=5, explain=True)
    outputs = {
        "30B plan (TOML)": str(write_plan(big, plan_dir / "stepvideo-t2v-30b.toml")),
        "30B plan (plot)": str(plot_plan(big, plan_dir / "stepvideo-t2v-30b.png")),
    }
    # the tiny model on this machine: measure it first (quick probe, a few seconds)
    from step_infra.emulator.hwprobe import calibrate, quick_config

    profile = plan_dir / "hardware_profile.json"
    calibrate(profile, cfg=quick_config(gloo=False), ranks_per_node=2)
    local = ClusterSpec.from_profile(profile)
    tiny = make_plan(get_model("tiny-dit"), local, global_batch=8, vae_rate=None)
    print_plan(tiny, console, top=3)
    outputs["hardware profile"] = str(profile)
    outputs["tiny plan (TOML)"] = str(write_plan(tiny, plan_dir / "tiny-dit.toml"))
    return outputs


def stage_eviction(out: Path, console: Console) -> dict[str, str]:
    """StepTelemetry: 3 torchrun agents + 1 hot spare, one node slowed 30%, evicted, replaced."""
    from step_infra.telemetry.story import run_eviction_story

    run_dir = out / "telemetry"
    result, report = run_eviction_story(run_dir, console=console)
    if not result.ok or not result.evicted or not result.joined:
        raise DemoStageError(
            f"eviction story did not complete: {result.reason}, evicted {result.evicted}, "
            f"joined {result.joined} (logs in {run_dir / 'logs'})"
        )
    return {"telemetry run": str(run_dir), "telemetry report": str(report)}


STAGES: tuple[tuple[str, Stage], ...] = (
    ("environment", stage_environment),
    ("parallel plan (Step Emulator)", stage_plan),
    ("straggler eviction (StepTelemetry + TorchElastic)", stage_eviction),
)


def run_demo(
    run_dir: str | Path, *, console: Console, stages: tuple[tuple[str, Stage], ...] = STAGES
) -> Path:
    """Run ``stages`` into ``run_dir`` and return the path of its ``summary.json``."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outputs: dict[str, str] = {}
    timings: dict[str, float] = {}
    for index, (title, stage) in enumerate(stages, start=1):
        console.rule(f"{index}. {title}")
        t0 = time.perf_counter()
        outputs.update(stage(out, console))
        timings[title] = round(time.perf_counter() - t0, 2)
    summary = {
        "stages": [title for title, _ in stages],
        "stage_wall_s": timings,
        "outputs": outputs,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    console.rule("done")
    console.print(f"outputs written to [bold]{out.resolve()}[/] in {summary['wall_s']} s")
    for name, path in outputs.items():
        console.print(f"  {name:<20} {path}")
    return summary_path

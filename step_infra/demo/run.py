"""``step-infra demo``: the main job end to end on embedded defaults.

Runs every stage that exists, in the order the real job uses them, each writing into its own
folder of the run directory, and ends with a summary of where everything went. A failed stage
stops the demo with a non-zero exit, so `make demo` never reports success it did not have.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def stage_train(out: Path, console: Console) -> dict[str, str]:
    """The main job: encoder servers stream over StepRPC to 2 nodes x 2 trainer ranks + a hot
    spare; a node is throttled to a third of its speed (detected, priced, evicted, the spare
    joins) and later a trainer is killed with -9 (recovered from the last durable checkpoint).
    Then the same job runs briefly with its VAE supply at half the consumption just measured,
    to show what an under-sized encoder split costs on whatever machine this runs."""
    from step_infra.train.job.config import Faults, tiny_t2v
    from step_infra.train.job.launcher import run_training_job
    from step_infra.train.job.progress import JobProgressPrinter
    from step_infra.train.job.report import job_metrics, write_job_report

    cfg = tiny_t2v()
    run_dir = out / "train"
    result = run_training_job(
        cfg, run_dir, on_event=JobProgressPrinter(console, run_dir), fresh=True
    )
    m = job_metrics(run_dir)
    faults = [e["event"] for e in m["faults"]]
    problems = []
    if not result.ok:
        problems.append(f"job failed: {result.reason}")
    if result.elastic is not None and not (result.elastic.evicted and result.elastic.joined):
        problems.append("the slowed node was not evicted and replaced")
    if "fault_injected" not in faults or faults.count("restart") < 2:
        problems.append(f"the kill -9 was not followed by a restart (events: {faults})")
    if not m["audit"]["exactly_once"]:
        problems.append(f"data audit failed: {m['audit']}")
    if problems:
        raise DemoStageError("; ".join(problems) + f" (logs in {run_dir / 'logs'})")
    # The encoder split, shown by starving it: the same job with the VAE supply set to half
    # of what the trainers were measured to consume above, wherever this runs.
    runs = [_encoder_run(cfg, m)]
    demand = float(runs[0]["consumption_per_s"])
    if demand > 0:
        half = dataclasses.replace(cfg.servers, vae_servers=1, vae_rate=round(demand / 2, 2))
        console.rule(f"same job, VAE supply at half the trainers' demand ({demand / 2:.1f}/s)")
        starved = cfg.replace(servers=half, steps=20, faults=Faults())
        small_dir = out / "train-fewer-encoders"
        shutil.rmtree(small_dir, ignore_errors=True)
        (small_dir / "assets").mkdir(parents=True)
        shutil.copy(run_dir / "assets" / "vae.pt", small_dir / "assets" / "vae.pt")
        starved_result = run_training_job(
            starved,
            small_dir,
            on_event=JobProgressPrinter(console, small_dir),
            sample=False,
            report=False,
            predict=False,
        )
        if starved_result.elastic is not None and starved_result.elastic.evicted:
            # No fault was injected: an eviction here is a false one, and a bug.
            raise DemoStageError(
                f"the fault-free run evicted {starved_result.elastic.evicted} "
                f"(events in {small_dir / 'events.jsonl'})"
            )
        runs.append(_encoder_run(starved, job_metrics(small_dir)))
        stall = runs[-1]["data_stall_fraction"] or 0.0
        if stall < 0.1:  # supply at half the demand must starve the trainers about half the time
            raise DemoStageError(
                f"the VAE supply at half the measured demand stalled the trainers only "
                f"{stall:.1%} of the time (events in {small_dir / 'events.jsonl'})"
            )
    (run_dir / "encoder_experiment.json").write_text(json.dumps({"runs": runs}, indent=2))
    for r in runs:
        console.print(
            f"  {r['vae_servers']} VAE server(s): data stall {r['data_stall_fraction']}: {r['why']}"
        )
    report = write_job_report(run_dir)
    shutil.copy(report, out / "report.html")
    console.print(
        f"measured step {m.get('measured_step_s')} s vs emulator {m.get('predicted_step_s')} s; "
        f"data stall {m.get('data_stall_fraction')}; every sample once: "
        f"{m['audit']['exactly_once']}"
    )
    console.print(f"live dashboard: [bold]step-infra dashboard {run_dir}[/]")
    return {"training run": str(run_dir), "report": str(out / "report.html")}


def _encoder_run(cfg: Any, m: dict[str, Any]) -> dict[str, Any]:
    """One row of the encoder-split experiment, with the reason its stall is what it is."""
    supply = cfg.servers.vae_servers * cfg.servers.vae_rate
    step = m.get("measured_step_s") or float("nan")
    stall = m.get("data_stall_fraction") or 0.0
    consumption = cfg.global_batch / (step * (1 - stall)) if step == step else float("nan")
    verdict = "trainers wait for latents" if supply < consumption else "encoders stay ahead"
    return {
        "vae_servers": cfg.servers.vae_servers,
        "vae_rate": cfg.servers.vae_rate,
        "consumption_per_s": round(consumption, 2),
        "data_stall_fraction": m.get("data_stall_fraction"),
        "why": f"VAE servers supply {supply:g} samples/s, trainers consume {consumption:.1f}/s "
        f"when fed: {verdict}",
    }


STAGES: tuple[tuple[str, Stage], ...] = (
    ("environment", stage_environment),
    ("parallel plan (Step Emulator)", stage_plan),
    ("fault-tolerant streaming training (StepRPC + StepTelemetry + TorchElastic)", stage_train),
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

"""The main job's figures: fault recovery, data audit, data stall, step time vs the emulator.

Runs ``step-infra train`` (the recipe's faults included) into a fresh run directory and prints
the table ``runs/<dir>/job_metrics.json`` holds; ``make demo`` runs the same job and adds the
one-VAE-server-fewer comparison.

    python benchmarks/train_job.py --recipe tiny-t2v --json runs/bench/train_job.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from step_infra.train.job.config import get_recipe
from step_infra.train.job.launcher import run_training_job
from step_infra.train.job.progress import JobProgressPrinter
from step_infra.train.job.report import job_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-t2v", help="tiny-t2v (the demo's) or micro-t2v")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/train-job"))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    console = Console()
    result = run_training_job(
        get_recipe(args.recipe),
        args.run_dir,
        on_event=JobProgressPrinter(console, args.run_dir),
        fresh=True,
    )
    m = job_metrics(args.run_dir)
    faults = [
        (e["event"], e.get("node"), e.get("step", e.get("resume_step", e.get("last_step"))))
        for e in m["faults"]
    ]
    table = Table(title=f"{args.recipe}: {result.reason}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = {
        "samples trained exactly once": m["audit"]["exactly_once"],
        "steps re-run after restarts": m["audit"]["steps_rerun_after_restart"],
        "data stall (steady state)": m.get("data_stall_fraction"),
        "data stall (all steps)": m.get("data_stall_fraction_all_steps"),
        "measured step s (healthy median)": m.get("measured_step_s"),
        "steps beside a checkpoint write s (median)": m.get("checkpoint_step_s"),
        "mean step s (every step)": m.get("mean_step_s_all"),
        "emulator step s": m.get("predicted_step_s"),
        "prediction terms s": m.get("prediction_terms"),
        "prediction error": m.get("prediction_error"),
        "faults": "; ".join(
            f"{e} {n or ''}" + (f" @{s}" if s is not None else "") for e, n, s in faults
        ),
    }
    for k, v in rows.items():
        table.add_row(k, str(v))
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"ok": result.ok, **rows, "metrics": m}, indent=2, default=str)
        )
        console.print(f"results written to {args.json}")
    if not result.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

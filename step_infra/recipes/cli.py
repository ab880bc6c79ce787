"""``step-infra recipe``: run the tiny staged recipe end to end and print what it measured.

Imports only typer/rich/stdlib at module level; torch comes in inside the command body.
"""

from __future__ import annotations

import json
import logging

import typer
from rich.table import Table

from step_infra.console import make_console


def recipe(
    name: str = typer.Argument("tiny", help="Recipe to run (only 'tiny' on a CPU)."),
    run_dir: str = typer.Option(
        "runs/tiny-staged", help="Run directory (config, checkpoints, results)."
    ),
    scale: float = typer.Option(
        1.0, help="Multiply every stage's step count (0.1 for a smoke run)."
    ),
    eval_prompts: int = typer.Option(48, help="Prompts per language for the motion check."),
    turbo: bool = typer.Option(False, help="Also distil an 8-step Turbo student at the end."),
    threads: int = typer.Option(2, help="torch CPU threads."),
) -> None:
    """Train VAE -> T2I -> T2VI low -> T2VI high -> T2V -> DPO -> average on synthetic clips."""
    if name != "tiny":
        raise typer.BadParameter(f"unknown recipe {name!r}; available: tiny")
    import dataclasses
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from step_infra.recipes.runner import run_recipe
    from step_infra.recipes.stages import tiny_staged_recipe

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = dataclasses.replace(
        tiny_staged_recipe(scale=scale, turbo=turbo), eval_prompts=eval_prompts
    )
    results = run_recipe(config, run_dir)
    console = make_console()
    table = Table(title=f"recipe {config.name}: {results['seconds']} s")
    for col in ("stage", "loss first 20%", "loss last 20%", "s"):
        table.add_column(col)
    vae = results["vae"]
    table.add_row("vae", f"{vae['loss_first']:.4f}", f"{vae['loss_last']:.4f}", "")
    for stage, r in results["stages"].items():
        if "loss_first" in r:
            table.add_row(
                stage, f"{r['loss_first']:.4f}", f"{r['loss_last']:.4f}", str(r["seconds"])
            )
    console.print(table)
    console.print(f"VAE PSNR {vae['psnr_db']:.2f} dB")
    for key in ("before_dpo", "after_dpo", "after_average", "final"):
        if key in results:
            console.print(f"motion check {key}: {json.dumps(results[key])}")
    if "turbo" in results:
        t = results["turbo"]
        for key in ("teacher_50_steps_cfg", "teacher_8_steps_cfg", "student_8_steps_no_cfg"):
            console.print(f"turbo {key}: {json.dumps(t[key])}")
        console.print(f"turbo latent RMSE vs teacher@50: {json.dumps(t['rel_rmse_vs_teacher_50'])}")
    console.print(f"results: {run_dir}/results.json")

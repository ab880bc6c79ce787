"""``step-infra plan``: imports only typer/rich at start-up (``calibrate`` is in calibrate_cmd.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from step_infra.console import make_console

BREAKDOWN_LABELS = {
    "t_compute_dense_s": "compute: dense matmuls",
    "t_compute_attention_s": "compute: attention",
    "t_compute_elementwise_s": "compute: element-wise",
    "t_recompute_s": "recomputation",
    "t_tp_comm_exposed_s": "TP comm (exposed)",
    "t_tp_comm_hidden_s": "TP comm (hidden)",
    "t_cp_comm_exposed_s": "CP comm (exposed)",
    "t_cp_comm_hidden_s": "CP comm (hidden)",
    "t_pp_comm_s": "PP send/recv",
    "t_bubble_s": "pipeline bubble",
    "t_dp_comm_exposed_s": "DP comm (exposed)",
    "t_dp_comm_hidden_s": "DP comm (hidden)",
    "t_optimizer_s": "optimizer step",
}


def print_plan(plan: object, console: Console, *, top: int = 10, explain: bool = False) -> None:
    """The top layouts, the chosen one's breakdown and the GPU split."""
    from step_infra.emulator.planner import PlanSearch

    assert isinstance(plan, PlanSearch)
    m, cl, ch = plan.model, plan.trainer_cluster, plan.chosen
    table = Table(
        title=f"{m.name}: top layouts of {len(plan.table)} that fit, "
        f"{cl.num_gpus} x {cl.gpu.name} (searched in {plan.search_s:.2f} s)"
    )
    for col in (
        "tp",
        "pp",
        "vpp",
        "cp",
        "kind",
        "dp",
        "mb",
        "SP",
        "recompute",
        "dist opt",
        "step s",
        "TFLOP/s/GPU",
        "MFU",
        "GB/GPU",
    ):
        table.add_column(col, justify="right")
    for _, r in plan.table.head(top).iterrows():
        table.add_row(
            *(str(r[k]) for k in ("tp", "pp", "vpp", "cp")),
            str(r["cp_kind"]) if r["cp"] > 1 else "-",
            str(r["dp"]),
            str(r["mb"]),
            "y" if r["sp"] else "n",
            str(r["recompute"]),
            "y" if r["dist_opt"] else "n",
            f"{r['step_time_s']:.3f}",
            f"{r['tflops_per_gpu']:.0f}",
            f"{r['mfu']:.1%}",
            f"{r['memory_gb_per_gpu']:.1f}",
        )
    console.print(table)
    console.print(f"[bold]chosen:[/] {ch.strategy}")
    console.print(f"  {ch.summary()}")
    times = Table(title="where the step goes", show_header=True)
    times.add_column("time")
    times.add_column("s", justify="right")
    times.add_column("share", justify="right")
    for key, label in BREAKDOWN_LABELS.items():
        v = ch.breakdown.get(key, 0.0)
        if v > 0:
            share = f"{v / ch.step_time_s:.1%}" if "hidden" not in key else "(overlapped)"
            times.add_row(label, f"{v:.4f}", share)
    mem = Table(title="memory per GPU")
    mem.add_column("kind")
    mem.add_column("GB", justify="right")
    for key in (
        "mem_params_gb",
        "mem_grads_gb",
        "mem_optimizer_gb",
        "mem_activations_gb",
        "mem_buffers_gb",
    ):
        mem.add_row(key[4:-3], f"{ch.breakdown[key]:.2f}")
    mem.add_row("[bold]total[/]", f"{ch.memory_gb_per_gpu:.2f} of {cl.gpu.hbm_gb:.0f}")
    console.print(times)
    console.print(mem)
    if plan.allocation is not None:
        a = plan.allocation
        console.print(
            f"[bold]GPU split:[/] {a.trainer_gpus} trainer GPUs, {a.vae_gpus} VAE, {a.text_gpus} text-encoder, "
            f"{a.spare_gpus} spare: {a.training_samples_per_s:.2f} samples/s, encoders at "
            f"{1 + a.headroom:.2f}x the trainers' demand ({'stalls' if a.stalls else 'no data stall'})"
        )
    if plan.allocation_note:
        console.print(f"[yellow]{plan.allocation_note}[/]")
    if explain:
        console.print(
            f"parameters: {plan.parameters:,} ({plan.parameters / 1e9:.2f} B); "
            f"sequence {m.seq_len:,} tokens; Pareto frontier: {len(plan.frontier)} layouts"
        )


def plan(
    model: Annotated[
        str, typer.Option(help="Model preset (e.g. stepvideo-t2v-30b, llama3-70b, tiny-dit).")
    ] = "stepvideo-t2v-30b",
    gpu: Annotated[
        str, typer.Option(help="GPU preset: a100-80g, h100-sxm, h200, h20, b200.")
    ] = "h100-sxm",
    gpus: Annotated[int, typer.Option(help="Number of GPUs.")] = 2048,
    profile: Annotated[
        Path | None,
        typer.Option(help="Hardware profile from `step-infra calibrate` (replaces --gpu)."),
    ] = None,
    frames: Annotated[
        int | None, typer.Option(help="Video frames (DiT); with --height/--width sets the tokens.")
    ] = 204,
    height: Annotated[int, typer.Option(help="Video height in pixels.")] = 544,
    width: Annotated[int, typer.Option(help="Video width in pixels.")] = 992,
    global_batch: Annotated[int, typer.Option(help="Samples per step.")] = 256,
    precision: Annotated[str, typer.Option(help="bf16 or fp8 matmuls.")] = "bf16",
    top: Annotated[int, typer.Option(help="Rows of the table.")] = 10,
    explain: Annotated[
        bool, typer.Option(help="Also print parameter count and model details.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Write the breakdown and landscape to .png or .html.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Strategy TOML to write.")] = Path(
        "runs/plan/strategy.toml"
    ),
    vae_rate: Annotated[
        float, typer.Option(help="VAE samples/s per GPU (measured or assumed).")
    ] = 0.5,
    text_rate: Annotated[
        float, typer.Option(help="Text-encoder samples/s per GPU (measured or assumed).")
    ] = 50.0,
) -> None:
    """Rank every TP/PP/VPP/CP/DP layout of a model on a cluster, explain the best, split GPUs
    between encoders and trainers, and write a strategy TOML the trainer reads."""
    import dataclasses

    from step_infra.emulator.planner import make_plan, plot_plan, write_plan
    from step_infra.emulator.presets import cluster_for, get_model
    from step_infra.emulator.specs import ClusterSpec

    console = make_console(min_width=130)
    try:
        spec = get_model(model)
        if spec.kind == "dit" and frames is not None and model != "tiny-dit":
            spec = spec.with_video(frames, height, width)
        if profile is not None:
            local = ClusterSpec.from_profile(profile)
            cluster = dataclasses.replace(
                local,
                gpus_per_node=min(gpus, local.gpus_per_node),
                nodes=max(1, gpus // local.gpus_per_node),
            )
        else:
            cluster = cluster_for(gpu, gpus)
        result = make_plan(
            spec,
            cluster,
            global_batch=global_batch,
            precision=precision,
            vae_rate=vae_rate,
            text_rate=text_rate,
        )
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    print_plan(result, console, top=top, explain=explain)
    path = write_plan(result, out)
    console.print(f"strategy written to [bold]{path}[/]")
    if plot is not None:
        console.print(f"plot written to [bold]{plot_plan(result, plot)}[/]")

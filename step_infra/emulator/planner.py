"""One planning run: search, choose, allocate encoders, explain, save. Used by the CLI and demo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from step_infra.emulator.allocation import Allocation, allocate_gpus
from step_infra.emulator.counts import parameter_count
from step_infra.emulator.estimate import Estimate, estimate
from step_infra.emulator.plan_io import save_plan
from step_infra.emulator.search import pareto, row_strategy, search
from step_infra.emulator.specs import ClusterSpec, ModelSpec

if TYPE_CHECKING:
    import pandas as pd

# Assumed encoder throughput (samples/s per GPU) for a 204x544x992 clip on one H100 when
# nothing is measured: an order-of-magnitude guess, not a measurement. Pass measured rates
# from the encoder servers (`step-infra plan --vae-rate --text-rate`).
DEFAULT_VAE_RATE = 0.5
DEFAULT_TEXT_RATE = 50.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    table: pd.DataFrame
    frontier: pd.DataFrame
    chosen: Estimate
    allocation: Allocation | None
    allocation_note: str
    parameters: int
    search_s: float


def make_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    *,
    global_batch: int,
    precision: str = "bf16",
    vae_rate: float | None = DEFAULT_VAE_RATE,
    text_rate: float = DEFAULT_TEXT_RATE,
    **fixed: int,
) -> Plan:
    """Search every layout, pick the fastest that fits, price it exactly, split the GPUs."""
    import time

    t0 = time.perf_counter()
    table = search(model, cluster, global_batch=global_batch, precision=precision, **fixed)  # type: ignore[arg-type]
    search_s = time.perf_counter() - t0
    if table.empty:
        raise ValueError(
            f"no layout of {model.name} fits in {cluster.gpu.hbm_gb:.0f} GB on {cluster.num_gpus} "
            f"{cluster.gpu.name}: try more GPUs, a smaller micro-batch or a GPU with more memory"
        )
    chosen = estimate(model, cluster, row_strategy(table.iloc[0], precision=precision))
    allocation, note = None, "" if model.kind == "dit" else "no encoder split: not a video DiT"
    if vae_rate is not None and model.kind == "dit":
        s = chosen.strategy
        # weak scaling: each trainer GPU consumes what it does in the chosen layout
        try:
            allocation = allocate_gpus(
                cluster.num_gpus,
                trainer_samples_per_s=chosen.samples_per_s / cluster.num_gpus,
                vae_samples_per_s_per_gpu=vae_rate,
                text_samples_per_s_per_gpu=text_rate,
                trainer_unit=s.tp * s.pp * s.cp,
            )
        except ValueError as exc:
            note = f"no encoder split: {exc}"
    return Plan(
        model=model,
        cluster=cluster,
        table=table,
        frontier=pareto(table),
        chosen=chosen,
        allocation=allocation,
        allocation_note=note,
        parameters=parameter_count(model),
        search_s=search_s,
    )


def write_plan(plan: Plan, out: str | Path) -> Path:
    return save_plan(out, plan.model.name, plan.chosen, plan.allocation)


def plot_plan(plan: Plan, out: str | Path) -> Path:
    """Breakdown bars of the chosen layout and the search landscape (time vs memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    times = {k[2:-2]: v for k, v in plan.chosen.breakdown.items() if k.startswith("t_") and v > 0}
    ax1.barh(list(times), list(times.values()), color="#4c8bd6")
    ax1.set_xlabel("seconds per step")
    ax1.set_title(f"{plan.model.name}: chosen layout, {plan.chosen.step_time_s:.2f} s/step")
    t = plan.table
    ax2.scatter(t["memory_gb_per_gpu"], t["step_time_s"], s=4, alpha=0.3, label="layouts that fit")
    ax2.plot(
        plan.frontier["memory_gb_per_gpu"],
        plan.frontier["step_time_s"],
        "r.-",
        label="Pareto frontier",
    )
    ax2.set_xlabel("memory per GPU (GB)")
    ax2.set_ylabel("step time (s)")
    ax2.set_yscale("log")
    ax2.legend()
    ax2.set_title(f"{len(t)} layouts on {plan.cluster.num_gpus} {plan.cluster.gpu.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".html":
        import base64
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        path.write_text(
            f"<html><body><img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'></body></html>"
        )
    else:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

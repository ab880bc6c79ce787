"""One planning run: search, choose, allocate encoders, explain, save. Used by the CLI and demo."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from step_infra.emulator.allocation import Allocation, split_for_trainers
from step_infra.emulator.counts import parameter_count
from step_infra.emulator.estimate import Estimate, estimate
from step_infra.emulator.plan import save_plan
from step_infra.emulator.search import pareto, row_strategy, search
from step_infra.emulator.specs import ClusterSpec, ModelSpec

if TYPE_CHECKING:
    import pandas as pd

# Assumed encoder throughput (samples/s per GPU) for a 204x544x992 clip on one H100 when
# nothing is measured: an order-of-magnitude guess, not a measurement. Pass measured rates
# from the encoder servers (`step-infra plan --vae-rate --text-rate`).
DEFAULT_VAE_RATE = 0.5
DEFAULT_TEXT_RATE = 50.0


# Trainer sizes searched exactly when splitting GPUs, at most, and feasible ones compared.
MAX_SPLIT_SEARCHES = 8
SPLIT_CANDIDATES = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanSearch:
    """A planning run. ``table`` and ``chosen`` are searched on ``trainer_cluster``, the GPUs
    the encoder split leaves to the trainers (the whole ``cluster`` when there is no split),
    so the chosen layout's ``tp * pp * cp * dp`` is ``allocation.trainer_gpus``."""

    model: ModelSpec
    cluster: ClusterSpec
    table: pd.DataFrame
    frontier: pd.DataFrame
    chosen: Estimate
    allocation: Allocation | None
    allocation_note: str
    parameters: int
    search_s: float
    trainer_cluster: ClusterSpec


def _trainer_cluster(cluster: ClusterSpec, trainers: int) -> ClusterSpec:
    """The part of ``cluster`` given to ``trainers`` GPUs: whole nodes, or part of the one."""
    if cluster.num_gpus <= cluster.gpus_per_node:
        return dataclasses.replace(cluster, nodes=1, gpus_per_node=trainers)
    assert trainers % cluster.gpus_per_node == 0, (trainers, cluster.gpus_per_node)
    return dataclasses.replace(cluster, nodes=trainers // cluster.gpus_per_node)


def trainer_sizes(model: ModelSpec, cluster: ClusterSpec, global_batch: int) -> list[int]:
    """Trainer GPU counts below the cluster's that some layout fills exactly, largest first:
    ``tp * pp * cp * dp`` with the search's tp (powers of 2 up to a node), pp (divisors of
    the layers), cp (powers of 2 up to 64) and a dp that divides the global batch; on whole
    nodes when the cluster has more than one (a node is not shared by trainers and encoders)."""
    n, per_node = cluster.num_gpus, cluster.gpus_per_node
    tps = [2**i for i in range(13) if 2**i <= per_node]
    pps = [d for d in range(1, model.layers + 1) if model.layers % d == 0]
    groups = {t * p * 2**c for t in tps for p in pps for c in range(7)}
    dps = [d for d in range(1, min(global_batch, n) + 1) if global_batch % d == 0]
    sizes = {g * d for g in groups for d in dps if g * d < n}
    if n > per_node:
        sizes = {x for x in sizes if x % per_node == 0}
    return sorted(sizes, reverse=True)


def _best_layout(
    model: ModelSpec, cluster: ClusterSpec, *, global_batch: int, precision: str, **fixed: int
) -> tuple[pd.DataFrame, Estimate]:
    table = search(model, cluster, global_batch=global_batch, precision=precision, **fixed)  # type: ignore[arg-type]
    if table.empty:
        raise ValueError(
            f"no layout of {model.name} fits in {cluster.gpu.hbm_gb:.0f} GB on {cluster.num_gpus} "
            f"{cluster.gpu.name}: try more GPUs, a smaller micro-batch or a GPU with more memory"
        )
    return table, estimate(model, cluster, row_strategy(table.iloc[0], precision=precision))


def make_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    *,
    global_batch: int,
    precision: str = "bf16",
    vae_rate: float | None = DEFAULT_VAE_RATE,
    text_rate: float = DEFAULT_TEXT_RATE,
    **fixed: int,
) -> PlanSearch:
    """Search every layout, pick the fastest that fits, split the GPUs, price it exactly.

    For a video DiT with encoder rates the split and the layout depend on each other: the
    encoders take GPUs from the trainers, and the trainers' layout (hence what they consume)
    depends on how many GPUs they get. So the layout is searched per candidate split: trainer
    counts that some layout fills exactly (:func:`trainer_sizes`), largest first, skipping
    those whose encoders (sized with the per-GPU consumption of the all-GPU layout) would
    not fit; each remaining count is searched on its own GPUs and its encoders sized for
    that layout's exact consumption (``split_for_trainers``). Of the first
    ``SPLIT_CANDIDATES`` counts that are fed without a stall (``MAX_SPLIT_SEARCHES``
    searches at most), the one with the highest training throughput is kept. The chosen
    layout is the one searched on those trainer GPUs: its ``tp * pp * cp * dp`` equals
    ``allocation.trainer_gpus``.
    """
    import time

    t0 = time.perf_counter()
    table, chosen = _best_layout(
        model, cluster, global_batch=global_batch, precision=precision, **fixed
    )
    search_s = time.perf_counter() - t0
    trainer_cluster = cluster
    allocation, note = None, "" if model.kind == "dit" else "no encoder split: not a video DiT"
    if vae_rate is not None and model.kind == "dit" and min(vae_rate, text_rate) <= 0:
        note = f"no encoder split: encoder rates are not > 0 (vae={vae_rate}, text={text_rate})"
    elif vae_rate is not None and model.kind == "dit":
        per_gpu = chosen.samples_per_s / cluster.num_gpus  # weak scaling, for the first cut
        found: list[tuple[Allocation, pd.DataFrame, Estimate, ClusterSpec]] = []
        searches, reason = 0, "every trainer count leaves too few GPUs for its encoders"
        for n in trainer_sizes(model, cluster, global_batch):
            if searches == MAX_SPLIT_SEARCHES or len(found) == SPLIT_CANDIDATES:
                break
            guess = n * per_gpu
            if n + math.ceil(guess / vae_rate) + math.ceil(guess / text_rate) > cluster.num_gpus:
                continue
            searches += 1
            sub = _trainer_cluster(cluster, n)
            try:
                sub_table, layout = _best_layout(
                    model, sub, global_batch=global_batch, precision=precision, **fixed
                )
                fed = split_for_trainers(
                    cluster.num_gpus,
                    n,
                    trainer_samples_per_s=layout.samples_per_s,
                    vae_samples_per_s_per_gpu=vae_rate,
                    text_samples_per_s_per_gpu=text_rate,
                )
            except ValueError as exc:
                reason = str(exc)
                continue
            found.append((fed, sub_table, layout, sub))
        if found:
            allocation, table, chosen, trainer_cluster = max(
                found, key=lambda f: f[0].training_samples_per_s
            )
            rate = allocation.trainer_samples_per_s
            left = (
                cluster.num_gpus
                - allocation.trainer_gpus
                - math.ceil(rate / vae_rate - 1e-12)
                - math.ceil(rate / text_rate - 1e-12)
            )
            if left >= cluster.gpus_per_node:
                note = (
                    f"{left} GPUs beyond what the encoders need are given to them as margin: no "
                    f"layout of global batch {global_batch} fills more trainer GPUs (dp must "
                    "divide it); a batch with more divisors would use them"
                )
        else:
            note = f"no encoder split: {reason}"
    return PlanSearch(
        model=model,
        cluster=cluster,
        table=table,
        frontier=pareto(table),
        chosen=chosen,
        allocation=allocation,
        allocation_note=note,
        parameters=parameter_count(model),
        search_s=search_s,
        trainer_cluster=trainer_cluster,
    )


def write_plan(plan: PlanSearch, out: str | Path) -> Path:
    return save_plan(out, plan.model.name, plan.chosen, plan.allocation)


def plot_plan(plan: PlanSearch, out: str | Path) -> Path:
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
    ax2.set_title(
        f"{len(t)} layouts on {plan.trainer_cluster.num_gpus} {plan.trainer_cluster.gpu.name}"
    )
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

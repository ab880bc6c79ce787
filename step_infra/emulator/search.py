"""``search(model, cluster, **constraints)``: every valid layout, priced in one vectorized pass.

The candidate grid is a cartesian product built with numpy (no Python loop per candidate);
the same rules as ``Strategy.validate`` mask invalid rows and the same cost model as
``estimate`` prices the rest. Results are ranked by step time (global batch fixed, so this is
throughput); ``pareto`` keeps the layouts no other beats on both time and memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from step_infra.emulator.costmodel import evaluate
from step_infra.emulator.estimate import throughput_columns
from step_infra.emulator.specs import ClusterSpec, ModelSpec
from step_infra.emulator.strategy import (
    CP_KINDS,
    RECOMPUTE,
    CpKind,
    Precision,
    Recompute,
    Strategy,
    strategy_rules,
)

if TYPE_CHECKING:
    import pandas as pd


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidate_grid(
    model: ModelSpec,
    cluster: ClusterSpec,
    *,
    global_batch: int,
    precision: str = "bf16",
    micro_batches: tuple[int, ...] = (1, 2, 4, 8),
    max_vpp: int = 8,
) -> dict[str, np.ndarray]:
    """All combinations of the layout knobs as flat integer columns."""
    n = cluster.num_gpus
    powers = [2**i for i in range(0, 13) if n % 2**i == 0]
    axes = {
        "tp": np.array([d for d in powers if d <= cluster.gpus_per_node]),
        "pp": np.array(_divisors(model.layers, model.layers)),
        "vpp": np.array([v for v in range(1, max_vpp + 1)]),
        "cp": np.array([d for d in powers if d <= 64]),
        "ring": np.array([0, 1]),
        "mb": np.array(micro_batches),
        "sp": np.array([0, 1]),
        "recompute": np.arange(len(RECOMPUTE)),
        "dist_opt": np.array([0, 1]),
    }
    mesh = np.meshgrid(*axes.values(), indexing="ij")
    c = {k: m.ravel() for k, m in zip(axes, mesh, strict=True)}
    per_replica = c["tp"] * c["pp"] * c["cp"]
    c["dp"] = np.where(n % per_replica == 0, n // np.maximum(per_replica, 1), 0)
    size = c["tp"].size
    c["gb"] = np.full(size, global_batch)
    c["overlap_grad"] = np.ones(size, dtype=int)
    # step-infra's trainer broadcasts ZeRO's updated parameters right after the step, not
    # under the next forward (train/zero.py): the search prices what it can run.
    c["overlap_param"] = np.zeros(size, dtype=int)
    c["overlap_tp"] = np.zeros(size, dtype=int)
    c["fp8"] = np.full(size, int(precision == "fp8"))
    return c


def search(
    model: ModelSpec,
    cluster: ClusterSpec,
    *,
    global_batch: int,
    precision: str = "bf16",
    fits_only: bool = True,
    top: int | None = None,
    **fixed: int,
) -> pd.DataFrame:
    """Price every valid layout; ``fixed`` pins knobs (e.g. ``tp=8``, ``recompute=2``).

    Columns: the layout, ``step_time_s``, ``tflops_per_gpu``, ``mfu``, ``samples_per_s``,
    ``memory_gb_per_gpu``, ``fits`` and the breakdown (``t_*`` seconds, ``mem_*_gb``).
    """
    c = candidate_grid(model, cluster, global_batch=global_batch, precision=precision)
    for knob, value in fixed.items():
        if knob not in c:
            raise ValueError(f"unknown constraint {knob!r}; expected one of {sorted(c)}")
        keep = c[knob] == value
        c = {k: v[keep] for k, v in c.items()}
    ok = c["dp"] > 0
    for rule in strategy_rules(model, cluster, c).values():
        ok &= rule
    # vpp only matters with pp > 1; keep one copy of the equivalent layouts otherwise
    ok &= (c["vpp"] == 1) | (c["pp"] > 1)
    # the CP kind only matters with cp > 1
    ok &= (c["ring"] == 0) | (c["cp"] > 1)
    c = {k: v[ok] for k, v in c.items()}
    if c["tp"].size == 0:
        raise ValueError(
            f"no valid layout of {model.name} on {cluster.num_gpus} GPUs with global batch {global_batch}"
            f" and {fixed or 'no constraints'}: try a global batch that is a multiple of more GPU counts"
        )
    import pandas as pd  # lazily: the CLI imports this package at start-up

    priced = evaluate(model, cluster, c)
    priced.update(throughput_columns(model, cluster, c, priced))

    frame = pd.DataFrame({**c, **priced})
    frame["cp_kind"] = np.array(CP_KINDS)[frame.pop("ring").to_numpy()]
    frame["recompute"] = np.array(RECOMPUTE)[frame["recompute"].to_numpy()]
    if fits_only:
        frame = frame[frame["fits"]]
    frame = frame.sort_values(["step_time_s", "memory_gb_per_gpu"]).reset_index(drop=True)
    return frame.head(top) if top else frame


def pareto(frame: pd.DataFrame) -> pd.DataFrame:
    """Layouts not beaten on both step time and memory (the time-memory frontier)."""
    ordered = frame.sort_values(["step_time_s", "memory_gb_per_gpu"])
    best_memory = ordered["memory_gb_per_gpu"].cummin()
    keep = ordered["memory_gb_per_gpu"] <= best_memory.shift(fill_value=np.inf) - 1e-9
    return ordered[keep].reset_index(drop=True)


def row_strategy(row: pd.Series, *, precision: str = "bf16") -> Strategy:
    """The ``Strategy`` of one search row (to re-price it with ``estimate`` or save it)."""
    return Strategy(
        tp=int(row["tp"]),
        pp=int(row["pp"]),
        vpp=int(row["vpp"]),
        cp=int(row["cp"]),
        cp_kind=cast(CpKind, str(row["cp_kind"])),
        dp=int(row["dp"]),
        micro_batch=int(row["mb"]),
        global_batch=int(row["gb"]),
        sequence_parallel=bool(row["sp"]),
        recompute=cast(Recompute, str(row["recompute"])),
        distributed_optimizer=bool(row["dist_opt"]),
        overlap_grad_reduce=bool(row["overlap_grad"]),
        overlap_param_gather=bool(row["overlap_param"]),
        overlap_tp_comm=bool(row["overlap_tp"]),
        precision=cast(Precision, precision),
    )

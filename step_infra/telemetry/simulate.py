"""Write a simulated run's telemetry (many ranks, optional straggler) without training.

For the dashboard's tests and demos: it drives real :class:`Recorder` objects into the real
Parquet store, with fabricated durations instead of measured ones (log-normal jitter, one
rank optionally stretched by ``slow_factor`` from ``slow_from`` on), so the page and the
detector see exactly the rows a training job would write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from step_infra.telemetry.recorder import Recorder, RecorderConfig
from step_infra.telemetry.store import ParquetStore

SECTIONS = {"data": 0.004, "fwd": 0.030, "bwd": 0.060, "optimizer": 0.006}


def write_simulated_run(
    run_dir: str | Path,
    *,
    ranks: int = 8,
    ranks_per_node: int = 4,
    steps: range = range(40),
    slow_rank: int | None = None,
    slow_from: int = 0,
    slow_factor: float = 1.3,
    jitter: float = 0.05,
    seed: int = 0,
) -> Path:
    """Append ``steps`` of telemetry for ``ranks`` ranks to ``run_dir``; return ``run_dir``."""
    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed + steps.start)
    t_origin = 1.7e9  # a fixed wall-clock origin shared by all simulated ranks
    for rank in range(ranks):
        cfg = RecorderConfig(
            rank=rank,
            node=f"node{rank // ranks_per_node}",
            window_steps=10,
            peak_flops_per_s=1e12,
            system_metrics=False,
        )
        with Recorder(cfg, [ParquetStore(run_dir)]) as rec:
            for step in steps:
                stretch = slow_factor if rank == slow_rank and step >= slow_from else 1.0
                rec.begin_step(step)
                compute = 0.0
                for name, base in SECTIONS.items():
                    seconds = base * float(np.exp(rng.normal(0.0, jitter))) * stretch
                    compute += seconds if name != "data" else 0.0
                    rec.record_section(name, seconds)
                rec.record_section("compute", compute)
                # Every rank starts the step together; it reaches the gradient all-reduce
                # after its compute, and waits there for the slowest rank (not simulated).
                step_start = t_origin + step * 0.2
                rec.record_arrival(
                    "grad_allreduce", arrived_unix_s=step_start + compute, wait_s=0.0
                )
                rec.end_step(
                    loss=2.0 * float(np.exp(-step / 40.0)) + 0.01 * float(rng.normal()),
                    tokens=4096.0,
                    flops=4e10,
                    data_wait_s=SECTIONS["data"],
                    step_time_s=compute + SECTIONS["data"] + 0.005,
                )
    return run_dir

"""Write a simulated run's telemetry (many ranks, optional straggler) without training.

For the dashboard's tests and demos: it drives real :class:`Recorder` objects into the real
Parquet store, with fabricated durations instead of measured ones (log-normal jitter, one
rank optionally stretched by ``slow_factor`` from ``slow_from`` on), so the page and the
detector see exactly the rows a training job would write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from step_infra.telemetry.recorder import Recorder, RecorderConfig
from step_infra.telemetry.store import SCHEMA, ParquetStore, store_path

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


# One step's rows, in the order a Recorder writes them: (kind, name).
_STEP_ROWS = (
    *(("section", name) for name in SECTIONS),
    ("section", "compute"),
    ("arrival", "grad_allreduce"),
    ("gauge", "loss"),
    ("gauge", "data_wait_s"),
    ("gauge", "tokens_per_s"),
    ("gauge", "mfu"),
    ("step", "step"),
)
_T_ORIGIN = 1.7e9  # a fixed wall-clock origin shared by all simulated ranks
_STEP_PERIOD_S = 0.2  # every rank starts step k at _T_ORIGIN + k * _STEP_PERIOD_S


def _node_sections(
    first_rank: int, stretch: np.ndarray, jitter: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sections (R, S, len(SECTIONS)), compute (R, S)) of one node's ranks: the values of
    :func:`write_simulated_run`, drawn with numpy (deterministic per node and seed)."""
    rng = np.random.default_rng([seed, first_rank])
    base = np.array(list(SECTIONS.values()))
    noise = np.exp(rng.normal(0.0, jitter, size=(*stretch.shape, len(base))))
    sec = base * noise * stretch[:, :, None]
    return sec, sec[:, :, 1:].sum(axis=2)  # compute = fwd + bwd + optimizer, not "data"


def _dictionary(codes: np.ndarray, values: list[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(values)).cast(pa.string())


def _node_table(
    ranks: np.ndarray,
    node: str,
    sec: np.ndarray,
    compute: np.ndarray,
    last: np.ndarray,
    *,
    first_step: int,
    seed: int,
) -> pa.Table:
    """The rows of one node (``ranks`` x steps) in the store's schema. Every rank starts a
    step together, reaches the gradient all-reduce after its compute and waits there for
    the last rank to arrive (``last``: per step, the job's latest compute)."""
    n_rank, steps = compute.shape
    n_row = len(_STEP_ROWS)
    rng = np.random.default_rng([seed, int(ranks[0]), 1])
    step_idx = np.arange(first_step, first_step + steps, dtype=np.int64)
    step_start = _T_ORIGIN + step_idx * _STEP_PERIOD_S
    wait = last[None, :] - compute
    # A synchronous step lasts as long on every rank.
    step_time = np.broadcast_to(last + SECTIONS["data"] + 0.005, compute.shape)
    loss = 2.0 * np.exp(-step_idx / 40.0) + 0.01 * rng.normal(size=(n_rank, steps))
    values = np.stack(
        [
            *(sec[:, :, k] for k in range(sec.shape[2])),
            compute,
            wait,
            loss,
            np.full_like(compute, SECTIONS["data"]),
            4096.0 / step_time,
            4e10 / (step_time * 1e12),
            step_time,
        ],
        axis=2,
    )  # (R, S, rows)
    times = np.repeat((step_start + step_time)[:, :, None], n_row, axis=2)  # stamped at the end
    times[:, :, len(SECTIONS) + 1] = step_start + compute  # the arrival: when it arrived
    n = n_rank * steps * n_row
    codes = np.tile(np.arange(n_row, dtype=np.int32), n_rank * steps)
    return pa.table(
        {
            "step": np.repeat(np.tile(step_idx, n_rank), n_row),
            "rank": np.repeat(ranks.astype(np.int32), steps * n_row),
            "node": _dictionary(np.zeros(n, dtype=np.int32), [node]),
            "attempt": np.zeros(n, dtype=np.int32),
            "kind": _dictionary(codes, [k for k, _ in _STEP_ROWS]),
            "name": _dictionary(codes, [name for _, name in _STEP_ROWS]),
            "value": values.reshape(-1),
            "t_unix_s": times.reshape(-1),
        },
        schema=SCHEMA,
    )


def write_synthetic_store(
    run_dir: str | Path,
    *,
    ranks: int = 4096,
    ranks_per_node: int = 8,
    steps: int = 1000,
    first_step: int = 0,
    slow_rank: int | None = None,
    slow_from: int = 0,
    slow_factor: float = 1.3,
    jitter: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a whole run's store at once, one part file per node; return ``run_dir``.

    The same schema, kinds, names and value model as :func:`write_simulated_run` (plus the
    wait inside the all-reduce, which a rank-by-rank simulation cannot know), built with
    numpy and written with pyarrow directly: driving 4,096 Recorders through 1,000 steps
    takes many minutes, this about ten seconds (for the dashboard's scale test and
    benchmark). Two passes over the nodes (the values are drawn again, deterministically):
    the first finds each step's last arrival at the all-reduce, the second writes. Steps
    are ``first_step ..`` (``slow_from`` counts from 0); call it again with a later
    ``first_step`` and another ``seed`` to append parts as a live run would.
    """
    if ranks < 1 or ranks_per_node < 1 or steps < 1:
        raise ValueError(
            f"ranks={ranks}, ranks_per_node={ranks_per_node}, steps={steps}: each must be >= 1"
        )
    directory = store_path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    firsts = range(0, ranks, ranks_per_node)

    def node(first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        node_ranks = np.arange(first, min(first + ranks_per_node, ranks))
        stretch = np.ones((len(node_ranks), steps))
        if slow_rank is not None and slow_rank in node_ranks:
            stretch[slow_rank - first, max(0, slow_from - first_step) :] = slow_factor
        return (node_ranks, *_node_sections(first, stretch, jitter, seed))

    last = np.max([node(first)[2].max(axis=0) for first in firsts], axis=0)
    for first in firsts:
        node_ranks, sec, compute = node(first)
        name = f"node{first // ranks_per_node}"
        table = _node_table(node_ranks, name, sec, compute, last, first_step=first_step, seed=seed)
        part = f"{name}-s{first_step:07d}-synthetic.parquet"
        tmp = directory / f".{part}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        tmp.rename(directory / part)
    return Path(run_dir)

"""Check the emulator against a real training step on this machine (tiny DiT, CPU, gloo).

A prediction is only trusted if it is checked where we can measure. This module times a
training step (forward, MSE loss, backward, ``finalize_grads``, AdamW) of the project's own
DiT, ``build_dit("tiny-dit")`` from :mod:`step_infra.models`, for three layouts: one rank;
DP=2 (gradients averaged over gloo by ``finalize_grads`` in one coalesced all-reduce after the
backward); TP=2 (megatron-core column/row-parallel linears over gloo). It prices the same
layouts with ``predict_step`` on the emulator's ``tiny-dit`` ``ModelSpec`` and a hardware
profile measured by :mod:`step_infra.emulator.hwprobe`, and reports predicted/measured.

It lives in ``train`` because it needs both sides: the emulator stands alone and must not
import the model (DESIGN.md), and the model knows nothing of the emulator. The step is priced
as it runs: gradients reduced once after the backward (``overlap_grad_reduce=False``), and
AdamW's per-tensor update priced with the ``ModelSpec``'s default (a fused optimizer, 0 host
ops: the ~830 ops of torch's per-tensor CPU AdamW on this model are not priced, about 1-2 %
of a step here). Distributed ranks are subprocesses of this module (``python -m
step_infra.train.emulator_check --worker``) that we start and, on timeout, kill by PID.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from step_infra.emulator.hwprobe import collect_rank_outputs, free_port

if TYPE_CHECKING:
    from step_infra.models.parallel import ParallelGroups

# Layout name -> (tp, dp): the three local layouts.
LAYOUTS: dict[str, tuple[int, int]] = {"1 rank": (1, 1), "DP=2 gloo": (1, 2), "TP=2 gloo": (2, 1)}
PRESET = "tiny-dit"  # the same name in step_infra.models and the emulator's presets
_MODULE = "step_infra.train.emulator_check"  # what the ranks run (``--worker``)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckConfig:
    """Workload of the check. ``batch`` is per data-parallel rank; ``seq_len`` overrides the
    preset's latent tokens (longer sequences make compute, not Python, dominate)."""

    batch: int = 8
    seq_len: int = 256
    steps: int = 8
    warmup: int = 3
    threads: int = 1
    timeout_s: float = 240.0

    def __post_init__(self) -> None:
        if min(self.batch, self.seq_len, self.steps, self.threads) < 1 or self.warmup < 0:
            raise ValueError(f"batch, seq_len, steps, threads must be >= 1 and warmup >= 0: {self}")


def latent_grid(seq_len: int) -> tuple[int, int, int]:
    """(frames, height, width) of ``seq_len`` latent tokens (patch 1), as close to a cube as
    the factors allow: 256 -> (4, 8, 8), 48 -> (3, 4, 4), a prime p -> (1, 1, p)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    best = (1, 1, seq_len)
    for f in range(1, round(seq_len ** (1 / 3)) + 1):
        if seq_len % f:
            continue
        rest = seq_len // f
        h = max(d for d in range(1, math.isqrt(rest) + 1) if rest % d == 0)
        cand = (f, h, rest // h)
        if max(cand) < max(best):
            best = cand
    return best


def time_steps(
    *, groups: ParallelGroups, dp_rank: int, cfg: CheckConfig, text_tokens: int
) -> float:
    """Median seconds of one training step of the real tiny DiT on this rank.

    ``groups`` is this rank's ``ParallelGroups`` (``ParallelGroups.single()`` in one process,
    else created over an initialized gloo world). Each data-parallel rank draws its own batch;
    the text is ``text_tokens`` tokens in all, two thirds from the short encoder and a third
    from the long one, packed as the trainer packs them.
    """
    import torch

    from step_infra.models import build_dit, get_preset
    from step_infra.models.parallel import finalize_grads

    torch.set_num_threads(cfg.threads)
    distributed = groups.tp_size * groups.dp_size > 1
    model = build_dit(PRESET, groups=groups, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c = get_preset(PRESET)
    f, h, w = latent_grid(cfg.seq_len)
    long_tokens = text_tokens // 3
    gen = torch.Generator().manual_seed(1 + dp_rank)
    x = torch.randn(cfg.batch, c.in_channels, f, h, w, generator=gen)  # (B, C, F, H, W)
    t = torch.rand(cfg.batch, generator=gen)
    text_short = torch.randn(cfg.batch, text_tokens - long_tokens, c.text_dim_short, generator=gen)
    text_long = torch.randn(cfg.batch, long_tokens, c.text_dim_long, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        if distributed:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        pred = model(x, t, text_short, None, text_long if long_tokens else None, None)
        torch.nn.functional.mse_loss(pred, target).backward()
        finalize_grads(model, groups)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist

    from step_infra.models.parallel import ParallelGroups
    from step_infra.topology import ProcessGrid

    rank, world, port, tp, dp = (int(v) for v in argv[:5])
    cfg = CheckConfig(**json.loads(argv[5]))
    text_tokens = int(argv[6])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        grid = ProcessGrid(tp=tp, dp=dp)
        groups = ParallelGroups.create(grid)
        sec = time_steps(
            groups=groups, dp_rank=grid.coords(rank)["dp"], cfg=cfg, text_tokens=text_tokens
        )
        if rank == 0:
            sys.stdout.write(json.dumps({"step_s": sec}) + "\n")
    finally:
        dist.destroy_process_group()


def measure_layout(tp: int, dp: int, cfg: CheckConfig, *, text_tokens: int = 24) -> float:
    """Median step seconds of the tiny DiT with ``tp x dp`` ranks (in-process when 1)."""
    if tp * dp == 1:
        from step_infra.models.parallel import ParallelGroups

        return time_steps(
            groups=ParallelGroups.single(), dp_rank=0, cfg=cfg, text_tokens=text_tokens
        )
    world, port = tp * dp, free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    args = [str(port), str(tp), str(dp), json.dumps(dataclasses.asdict(cfg)), str(text_tokens)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", _MODULE, "--worker", str(r), str(world), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outs = collect_rank_outputs(procs, timeout_s=cfg.timeout_s, what="local check rank")
    return float(json.loads(outs[0].strip().splitlines()[-1])["step_s"])


def predict_layout(
    profile_path: str | Path, tp: int, dp: int, cfg: CheckConfig, *, text_tokens: int = 24
) -> dict[str, Any]:
    """``predict_step`` of the same step on the measured profile: ``tp x dp`` ranks, one node,
    gradients reduced after the backward (as ``finalize_grads`` does)."""
    from step_infra.emulator import predict_step

    est = predict_step(
        PRESET,
        profile_path,
        tp=tp,
        dp=dp,
        micro_batch=cfg.batch,
        global_batch=cfg.batch * dp,
        seq_len=cfg.seq_len,
        text_tokens=text_tokens,
        overlap_grad_reduce=False,
    )
    return {"step_time_s": est.step_time_s, "breakdown": est.breakdown}


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped
    children): their difference over a window is what other processes took."""
    import resource

    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    return busy, own


class _OtherLoad:
    """Context manager: ``share`` is the fraction of the machine's CPU time that processes
    other than this one and its children used inside the ``with`` block."""

    share: float = 0.0

    def __enter__(self) -> _OtherLoad:
        self._busy, self._own = _cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = _cpu_seconds()
        wall = max(time.perf_counter() - self._t0, 1e-9)
        other = max(0.0, (busy - self._busy) - (own - self._own))
        self.share = min(1.0, other / (wall * (os.cpu_count() or 1)))


def run_local_check(
    profiles: dict[int, str | Path] | Callable[[int], str | Path],
    cfg: CheckConfig | None = None,
    *,
    layouts: dict[str, tuple[int, int]] | None = None,
    max_other_load: float = 1.0,
    attempts: int = 1,
) -> list[dict[str, Any]]:
    """Measure and predict every layout; one dict per layout with the ratio and error.

    ``profiles`` maps a world size to the hardware profile measured with that many ranks at once
    (``hwprobe.calibrate(..., ranks_per_node=n)``): ranks sharing a CPU get less each. A
    callable is called right before each layout is timed, so on a shared machine the profile and
    the step see the same background load.

    ``other_load`` is the share of the machine's CPU time that other processes used while the
    layout was profiled or timed (the larger of the two windows). On a shared machine a burst
    of someone else's work can take half of it; such a measurement is not of this job, and a
    profile taken under a load the step did not see (or the reverse) predicts another machine.
    A layout with ``other_load`` above ``max_other_load`` is profiled and timed again, up to
    ``attempts`` times in all; every attempt is kept in the row's ``attempts`` list, the row
    reports the last one, and ``contended`` says whether even that one was above the limit.
    """
    from step_infra.emulator import get_model

    if attempts < 1 or not 0.0 <= max_other_load <= 1.0:
        raise ValueError(
            f"attempts must be >= 1 and max_other_load in [0, 1], got {attempts}, {max_other_load}"
        )
    cfg = cfg or CheckConfig()
    text_tokens = get_model(PRESET).text_tokens
    rows = []
    for name, (tp, dp) in (layouts or LAYOUTS).items():
        world = tp * dp
        if not callable(profiles) and world not in profiles:
            raise ValueError(f"no hardware profile for {world} rank(s); have {sorted(profiles)}")
        tries: list[dict[str, Any]] = []
        while len(tries) < attempts and (not tries or tries[-1]["other_load"] > max_other_load):
            with _OtherLoad() as probe_load:
                profile = profiles(world) if callable(profiles) else profiles[world]
            with _OtherLoad() as step_load:
                measured = measure_layout(tp, dp, cfg, text_tokens=text_tokens)
            others = max(probe_load.share, step_load.share)
            pred = predict_layout(profile, tp, dp, cfg, text_tokens=text_tokens)
            used = json.loads(Path(profile).read_text())
            tries.append(
                {
                    "measured_step_s": measured,
                    "predicted_step_s": pred["step_time_s"],
                    "error": pred["step_time_s"] / measured - 1.0,
                    "other_load": others,
                    "other_load_probe": probe_load.share,
                    "other_load_step": step_load.share,
                    "breakdown": pred["breakdown"],
                    "profile": {**used["gpu"], **used["cluster"]},
                }
            )
        last = tries[-1]
        rows.append(
            {
                "layout": name,
                "tp": tp,
                "dp": dp,
                **last,
                "contended": last["other_load"] > max_other_load,
                "attempts": [
                    {k: v for k, v in t.items() if k not in ("breakdown", "profile")} for t in tries
                ],
            }
        )
    return rows


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(sys.argv[2:])

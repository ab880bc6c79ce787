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
from step_infra.emulator.strategy import CpKind, Strategy
from step_infra.topology import ProcessGrid

if TYPE_CHECKING:
    from step_infra.models.parallel import ParallelGroups

PRESET = "tiny-dit"  # the same name in step_infra.models and the emulator's presets
_MODULE = "step_infra.train.emulator_check"  # what the ranks run (``--worker``)


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """One layout the check runs and prices: the process grid's sizes, the CP kind, and the
    micro-batches each data-parallel rank's batch is cut into (a pipeline needs several, or
    its stages run one after the other)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    cp_kind: CpKind = "ulysses"
    dp: int = 1
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.cp, self.dp, self.micro_batches) < 1:
            raise ValueError(f"tp, pp, cp, dp, micro_batches must be >= 1: {self}")
        if self.cp_kind not in ("ulysses", "ring"):
            raise ValueError(f"cp_kind={self.cp_kind!r}; expected 'ulysses' or 'ring'")
        if self.micro_batches > 1 and self.pp == 1:
            raise ValueError(
                f"micro_batches={self.micro_batches} needs pp > 1: without a pipeline the check "
                "runs the batch as one micro-batch"
            )

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def grid(self) -> ProcessGrid:
        return ProcessGrid(dp=self.dp, pp=self.pp, cp=self.cp, tp=self.tp)

    def strategy(self, cfg: CheckConfig) -> Strategy:
        """The emulator's ``Strategy`` of the step as :func:`time_steps` runs it: gradients
        reduced after the backward, the replicated optimizer, ``micro_batches`` micro-batches
        of ``cfg.batch / micro_batches`` samples per data-parallel rank."""
        if cfg.batch % self.micro_batches:
            raise ValueError(
                f"batch={cfg.batch} does not split into micro_batches={self.micro_batches}; "
                "give a batch that is a multiple of it"
            )
        return Strategy(
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            cp_kind=self.cp_kind,
            dp=self.dp,
            micro_batch=cfg.batch // self.micro_batches,
            global_batch=cfg.batch * self.dp,
            distributed_optimizer=False,
            overlap_grad_reduce=False,
        )


# Layout name -> layout: the local layouts. PP=2 runs 4 micro-batches per step under
# 1F1B, so the bubble is (pp - 1) / (m + pp - 1) of it, as in a real pipeline.
LAYOUTS: dict[str, Layout] = {
    "1 rank": Layout(),
    "DP=2 gloo": Layout(dp=2),
    "TP=2 gloo": Layout(tp=2),
    "PP=2 gloo": Layout(pp=2, micro_batches=4),
    "ring CP=2 gloo": Layout(cp=2, cp_kind="ring"),
}


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
    *, groups: ParallelGroups, layout: Layout, dp_rank: int, cfg: CheckConfig, text_tokens: int
) -> float:
    """Median seconds of one training step of the real tiny DiT on this rank.

    ``groups`` is this rank's ``ParallelGroups`` (``ParallelGroups.single()`` in one process,
    else created over an initialized gloo world with ``layout.cp_kind``). Each data-parallel
    rank draws its own batch; the text is ``text_tokens`` tokens in all, two thirds from the
    short encoder and a third from the long one, packed as the trainer packs them. With
    ``pp > 1`` the step is the trainer's pipelined one (``build_pipeline``, 1F1B over
    ``layout.micro_batches`` micro-batches, ``summed_mse``, ``finalize_grads`` on the held
    chunks); otherwise ``build_dit(..., groups=groups)``, whose hooks shard the sequence over
    CP and the linears over TP, runs the batch at once. The first ``cfg.warmup`` steps (the
    pipeline's p2p shape inference, the allocator's first sizes) are not timed.
    """
    import torch

    from step_infra.models import build_dit, get_preset
    from step_infra.models.parallel import finalize_grads
    from step_infra.models.pipeline import build_pipeline, summed_mse

    torch.set_num_threads(cfg.threads)
    distributed = layout.world > 1
    c = get_preset(PRESET)
    f, h, w = latent_grid(cfg.seq_len)
    long_tokens = text_tokens // 3
    gen = torch.Generator().manual_seed(1 + dp_rank)
    x = torch.randn(cfg.batch, c.in_channels, f, h, w, generator=gen)  # (B, C, F, H, W)
    t = torch.rand(cfg.batch, generator=gen)
    text_short = torch.randn(cfg.batch, text_tokens - long_tokens, c.text_dim_short, generator=gen)
    text_long = torch.randn(cfg.batch, long_tokens, c.text_dim_long, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    model: torch.nn.Module
    if layout.pp > 1:
        layout.strategy(cfg)  # the batch must split into the micro-batches
        pipe = build_pipeline(
            PRESET,
            groups,
            n_microbatches=layout.micro_batches,
            loss_fn=summed_mse,
            seed=0,
            schedule="1f1b",
        )
        model = pipe.held
        loss_kwargs = {"global_batch": cfg.batch * layout.dp}

        def forward_backward() -> None:
            pipe.step(
                x,
                t,
                text_short,
                None,
                text_long if long_tokens else None,
                None,
                target=target,
                loss_kwargs=loss_kwargs,
                return_outputs=False,
            )

    else:
        model = build_dit(PRESET, groups=groups, seed=0)

        def forward_backward() -> None:
            pred = model(x, t, text_short, None, text_long if long_tokens else None, None)
            torch.nn.functional.mse_loss(pred, target).backward()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        if distributed:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        forward_backward()
        finalize_grads(model, groups)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist

    from step_infra.models.parallel import ParallelGroups

    rank, world, port = (int(v) for v in argv[:3])
    layout = Layout(**json.loads(argv[3]))
    cfg = CheckConfig(**json.loads(argv[4]))
    text_tokens = int(argv[5])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        grid = layout.grid()
        groups = ParallelGroups.create(grid, cp_kind=layout.cp_kind)
        sec = time_steps(
            groups=groups,
            layout=layout,
            dp_rank=grid.coords(rank)["dp"],
            cfg=cfg,
            text_tokens=text_tokens,
        )
        sys.stdout.write(json.dumps({"step_s": sec}) + "\n")
    finally:
        dist.destroy_process_group()


def measure_layout(layout: Layout, cfg: CheckConfig, *, text_tokens: int = 24) -> float:
    """Median step seconds of the tiny DiT in ``layout`` (in-process when it is one rank).
    With several ranks, the slowest rank's median: a step ends when its last rank is done
    (under 1F1B the first stage, which runs the last backward)."""
    if layout.world == 1:
        from step_infra.models.parallel import ParallelGroups

        return time_steps(
            groups=ParallelGroups.single(),
            layout=layout,
            dp_rank=0,
            cfg=cfg,
            text_tokens=text_tokens,
        )
    world, port = layout.world, free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    args = [
        str(port),
        json.dumps(dataclasses.asdict(layout)),
        json.dumps(dataclasses.asdict(cfg)),
        str(text_tokens),
    ]
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
    return max(float(json.loads(o.strip().splitlines()[-1])["step_s"]) for o in outs)


def predict_layout(
    profile_path: str | Path, layout: Layout, cfg: CheckConfig, *, text_tokens: int = 24
) -> dict[str, Any]:
    """``predict_step`` of the same step on the measured profile: ``layout.strategy(cfg)`` on
    one node (gradients reduced after the backward, as ``finalize_grads`` does)."""
    from step_infra.emulator import predict_step

    strategy = layout.strategy(cfg)
    est = predict_step(
        PRESET,
        profile_path,
        micro_batch=strategy.micro_batch,
        global_batch=strategy.global_batch,
        seq_len=cfg.seq_len,
        text_tokens=text_tokens,
        strategy=strategy,
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
    layouts: dict[str, Layout] | None = None,
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
    for name, layout in (layouts or LAYOUTS).items():
        world = layout.world
        if not callable(profiles) and world not in profiles:
            raise ValueError(f"no hardware profile for {world} rank(s); have {sorted(profiles)}")
        tries: list[dict[str, Any]] = []
        while len(tries) < attempts and (not tries or tries[-1]["other_load"] > max_other_load):
            with _OtherLoad() as probe_load:
                profile = profiles(world) if callable(profiles) else profiles[world]
            with _OtherLoad() as step_load:
                measured = measure_layout(layout, cfg, text_tokens=text_tokens)
            others = max(probe_load.share, step_load.share)
            pred = predict_layout(profile, layout, cfg, text_tokens=text_tokens)
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
                **dataclasses.asdict(layout),
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

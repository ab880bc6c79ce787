"""Run under ``torchrun``: does a parallel DiT match the one-rank DiT, outputs and gradients?

Each layout named on the command line (e.g. ``tp2 tp2sp cp2u cp2r dp2 tp2dp2``) is built
with the same seed as a one-rank reference, run forward and backward on the same batch (each
data-parallel rank on its slice), gradients finalized, and compared: outputs slice by slice,
gradients of tensor-parallel weights against the matching slice of the reference gradient.
Rank 0 prints one JSON line per layout; the exit status is 1 if any exceeds the tolerance.

Tolerance: fp32 throughout, only the order of reductions differs (all-reduce, split
matmuls, LSE merges), so relative errors sit near 1e-6; ``--tol`` (default 1e-4, relative to
the largest reference value of each tensor) leaves margin without hiding a real bug, which
shows up as O(1) differences.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
import torch.distributed as dist

from step_infra.emulator.plan import Plan
from step_infra.models.config import get_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups, SingleRankGroup, finalize_grads
from step_infra.topology import ProcessGrid

_LAYOUT = re.compile(r"^(?:tp(\d))?(?:cp(\d)([ur]))?(?:dp(\d))?(sp)?$")


def parse_layout(name: str) -> tuple[ProcessGrid, bool, str]:
    """``tp2sp`` -> (grid tp=2, sequence parallel); ``cp2r`` -> ring context parallel."""
    m = _LAYOUT.match(name)
    if not m or not any(m.groups()):
        raise ValueError(f"layout {name!r} not understood; e.g. tp2, tp2sp, cp2u, cp2r, tp2dp2")
    tp, cp, kind, dp, sp = m.groups()
    grid = ProcessGrid(tp=int(tp or 1), cp=int(cp or 1), dp=int(dp or 1))
    return grid, bool(sp), "ring" if kind == "r" else "ulysses"


def _batch(config_name: str, batch: int) -> tuple[torch.Tensor, ...]:
    c = get_preset(config_name)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, c.in_channels, 2, 4, 4, generator=g)
    t = torch.rand(batch, generator=g)
    ts = torch.randn(batch, 5, c.text_dim_short, generator=g)
    tl = torch.randn(batch, 3, c.text_dim_long, generator=g)
    sl = torch.tensor([5, 3, 2, 4][:batch])
    ll = torch.tensor([1, 3, 2, 0][:batch])
    target = torch.randn(batch, c.in_channels, 2, 4, 4, generator=g)
    return x, t, ts, sl, tl, ll, target


def run_layout(
    grid: ProcessGrid,
    sequence_parallel: bool,
    cp_kind: str,
    *,
    tol: float,
    batch: int = 4,
    preset: str = "micro-dit",
    finalize: bool = True,
) -> dict[str, object]:
    config = get_preset(preset).replace(zero_init_output=False)
    rank = dist.get_rank()
    x, t, ts, sl, tl, ll, target = _batch(preset, batch)

    one = SingleRankGroup()
    ref = build_dit(config, groups=ParallelGroups(tp=one, cp=one, dp=one, pp=one), seed=7)
    ref_out = ref(x, t, ts, sl, tl, ll)
    torch.nn.functional.mse_loss(ref_out, target).backward()

    groups = ParallelGroups.create(grid, sequence_parallel=sequence_parallel, cp_kind=cp_kind)
    model = build_dit(config, groups=groups, seed=7)
    dp_rank = grid.coords(rank)["dp"]
    sl_b = slice(dp_rank * batch // grid.dp, (dp_rank + 1) * batch // grid.dp)
    out = model(x[sl_b], t[sl_b], ts[sl_b], sl[sl_b], tl[sl_b], ll[sl_b])
    torch.nn.functional.mse_loss(out, target[sl_b]).backward()
    if finalize:
        finalize_grads(model, groups)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    out_err = rel(out.detach(), ref_out[sl_b].detach())
    grad_err, worst = 0.0, ""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        assert p.grad is not None and r is not None, name
        if getattr(p, "tensor_model_parallel", False) and groups.tp_size > 1:
            r = r.chunk(groups.tp_size, dim=p.partition_dim)[groups.tp_rank]  # type: ignore[attr-defined]
        e = rel(p.grad, r)
        if e > grad_err:
            grad_err, worst = e, name
    errs = torch.tensor([out_err, grad_err])
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    return {
        "grid": dict(zip(("dp", "pp", "cp", "tp"), grid.shape, strict=True)),
        "sequence_parallel": sequence_parallel,
        "cp_kind": cp_kind,
        "max_rel_err_output": float(errs[0]),
        "max_rel_err_grad": float(errs[1]),
        "worst_grad_on_rank0": worst,
        "ok": bool(errs.max() <= tol),
    }


def run_strategy(plan: Plan, *, tol: float) -> dict[str, object]:
    """Build the plan's preset (if small enough for the CPU) with its layout and check it.
    Settings this check cannot run (pipeline stages) are refused, not ignored."""
    plan.refuse({"pp": 1, "vpp": 1}, by="parallel_check (no pipeline parallelism yet)")
    preset = plan.preset if plan.preset in ("tiny-dit", "micro-dit") else "micro-dit"
    s = plan.strategy
    result = run_layout(
        plan.grid(dist.get_world_size()), s.sequence_parallel, s.cp_kind, tol=tol, preset=preset
    )
    result["strategy_preset"] = plan.preset
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("layouts", nargs="*", help="e.g. tp2 tp2sp cp2u cp2r dp2 tp2dp2")
    ap.add_argument("--strategy", help="a strategy TOML from `step-infra plan`")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument(
        "--no-finalize",
        action="store_true",
        help="negative control: skip the gradient reduction, so the check must fail",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    failed = False
    jobs: list[tuple[str, Plan | tuple[ProcessGrid, bool, str]]] = [
        (name, parse_layout(name)) for name in args.layouts
    ]
    if args.strategy:
        jobs.append(("strategy", Plan.load(args.strategy)))
    for name, job in jobs:
        if isinstance(job, Plan):
            result = run_strategy(job, tol=args.tol)
        else:
            grid, sp, kind = job
            result = run_layout(grid, sp, kind, tol=args.tol, finalize=not args.no_finalize)
        result["layout"] = name
        failed |= not result["ok"]
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

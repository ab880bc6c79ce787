"""Run under ``torchrun``: do the bucketed reducer and ZeRO-1 match the reference path?

Checks, named on the command line (rank 0 prints one JSON line per check; exit status 1 if
any fails):

- ``grad_sync``: :class:`~step_infra.train.grad_sync.GradReducer` against
  :func:`~step_infra.models.parallel.finalize_grads` on the same layout (``--tp``, ``--cp``,
  ``--sp``; dp fills the world), over two steps: one where every replica accumulates two
  micro-batches, one where the last replica has no samples. Also records the order of
  events in the first backward to show overlap: the first bucket's all-reduce starts
  before the last gradient of the backward is produced.
- ``zero``: ZeRO-1 AdamW (:func:`~step_infra.train.zero.make_sharded_adamw`) over three
  steps against replicated AdamW fed the same reduced gradients and against one rank's
  AdamW that accumulates the replicas' shares as micro-batches (both bitwise with dp=2:
  ``a + b`` is the same sum either way); the state held per rank; the whole batch in one
  forward on one rank against the reduced gradients (rounding only, ``WHOLE_BATCH_TOL``);
  a DCP checkpoint saved after two steps and resumed into fresh sharded and replicated
  optimizers (and a replicated one's checkpoint into a sharded one) gives the same third
  step.

  Why not compare parameters after AdamW with the whole-batch reference: AdamW's first
  steps divide by ``|g| + eps``; an element whose gradient is near ``eps`` (1e-8) turns a
  1e-11 rounding difference into a 2e-6 change of the update (5e-5 relative, measured).

- ``recompute``: selective and full recompute on the layout give the gradients of no
  recompute, bitwise.

Tolerances: the reducer adds the same numbers as ``finalize_grads``, only grouped
differently (dp x cp in one all-reduce, then tp), so the difference is a few fp32 ulps:
``--tol`` 1e-6 relative to each tensor's largest value; with dp=2 and no tp/cp it is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from step_infra.elastic.checkpoint import state_dict
from step_infra.models.config import get_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups, finalize_grads
from step_infra.models.recompute import apply_recompute
from step_infra.topology import ProcessGrid
from step_infra.train.grad_sync import GradReducer, make_dp_cp_group
from step_infra.train.zero import make_sharded_adamw, optimizer_state_bytes

PRESET = "micro-dit"
LR = 1e-2
# Gradients of the whole batch in one forward against per-replica shares reduced: different
# fp32 summation orders (batched matmuls, then the all-reduce), worst seen 7.5e-7 relative
# to a tensor's largest value; a real bug is O(1).
WHOLE_BATCH_TOL = 1e-5


def _samples(n: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` single-sample inputs (latents, t, short text, long text, target)."""
    c = get_preset(PRESET)
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, c.in_channels, 2, 4, 4, generator=g),
            torch.rand(1, generator=g),
            torch.randn(1, 5, c.text_dim_short, generator=g),
            torch.randn(1, 3, c.text_dim_long, generator=g),
            torch.randn(1, c.in_channels, 2, 4, 4, generator=g),
        )
        for _ in range(n)
    ]


def _loss(model: nn.Module, batch: list[tuple[torch.Tensor, ...]], global_batch: int) -> Any:
    """Sum of per-sample losses / global batch (the streaming trainer's scaling)."""
    x, t, ts, tl, target = (torch.cat(parts) for parts in zip(*batch, strict=True))
    out = model(x, t, ts, None, tl, None)
    per_sample = (out - target).square().flatten(1).mean(1)
    return per_sample.sum() / global_batch, per_sample.detach().sum()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _max_err(a: nn.Module, b: nn.Module, *, grads: bool) -> tuple[float, str]:
    worst, name = 0.0, ""
    ref = dict(b.named_parameters())
    for n, p in a.named_parameters():
        x, y = (p.grad, ref[n].grad) if grads else (p.detach(), ref[n].detach())
        assert x is not None and y is not None, n
        e = _rel(x, y)
        if e >= worst:
            worst, name = e, n
    return worst, name


def _all_max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _layout(tp: int, cp: int, sp: bool) -> tuple[ProcessGrid, ParallelGroups, Any]:
    grid = ProcessGrid.for_world(dist.get_world_size(), tp=tp, cp=cp)
    groups = ParallelGroups.create(grid, sequence_parallel=sp)
    return grid, groups, make_dp_cp_group(grid)


def check_grad_sync(tp: int, cp: int, sp: bool, *, tol: float, bucket_mb: float) -> dict[str, Any]:
    grid, groups, dp_cp = _layout(tp, cp, sp)
    config = get_preset(PRESET).replace(zero_init_output=False)
    ref = build_dit(config, groups=groups, seed=5)
    model = build_dit(config, groups=groups, seed=5)
    reducer = GradReducer(model, groups, dp_cp, bucket_mb=bucket_mb, dp_mean=False)
    replica, dp = grid.coords(dist.get_rank())["dp"], grid.dp
    events: list[tuple[str, Any]] = []
    original_all_reduce = dist.all_reduce

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("group") is dp_cp:
            events.append(("launch", tensor.numel()))
        return original_all_reduce(tensor, *args, **kwargs)

    for p in model.parameters():  # after the reducer's hooks: fire right after them
        p.register_post_accumulate_grad_hook(lambda _p: events.append(("grad", None)))
    results: dict[str, Any] = {}
    # step 0: two micro-batches per replica; step 1: the last replica gets no samples
    for step, counts in enumerate(([2] * dp, [3] * (dp - 1) + [0])):
        global_batch = sum(counts)
        data = _samples(global_batch, seed=100 + step)
        start = sum(counts[:replica])
        mine = data[start : start + counts[replica]]
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        ref_sum = torch.zeros(1)
        for s in mine:
            loss, part = _loss(ref, [s], global_batch)
            loss.backward()
            ref_sum += part
        finalize_grads(ref, groups, dp_mean=False, ride_along=[ref_sum])
        got_sum = torch.zeros(1)
        events.clear()
        dist.all_reduce = spy  # type: ignore[assignment]
        try:
            for i, s in enumerate(mine):
                loss, part = _loss(model, [s], global_batch)
                if i < len(mine) - 1:
                    with reducer.no_sync():
                        loss.backward()
                else:
                    loss.backward()
                    events.append(("backward_returned", None))
                got_sum += part
            reducer.finish(ride_along=[got_sum])
        finally:
            dist.all_reduce = original_all_reduce
        grad_err, worst = _max_err(model, ref, grads=True)
        loss_err = abs(float(got_sum) - float(ref_sum)) / max(abs(float(ref_sum)), 1e-12)
        kinds = [k for k, _ in events]
        overlapped = (
            "launch" in kinds
            and "backward_returned" in kinds
            and kinds.index("launch") < len(kinds) - 1 - kinds[::-1].index("grad")
        )
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, reducer.stats.launched_in_backward)
        results[f"step{step}"] = {
            "samples_per_replica": counts,
            "grad_err": grad_err,
            "loss_err": loss_err,
            "buckets": reducer.stats.buckets,
            "launched_in_backward_per_rank": per_rank,
            "first_launch_before_last_grad": overlapped,
            "worst_on_rank0": worst,
        }
    errs = _all_max([max(r["grad_err"], r["loss_err"]) for r in results.values()])
    overlap = _all_max([0.0 if results["step0"]["first_launch_before_last_grad"] else 1.0])
    ok = max(errs) <= tol and overlap[0] == 0.0 and results["step0"]["buckets"] > 1
    return {"check": "grad_sync", "grid": _grid(grid), "max_err": max(errs), "ok": ok, **results}


def _grid(grid: ProcessGrid) -> dict[str, int]:
    return dict(zip(("dp", "pp", "cp", "tp"), grid.shape, strict=True))


def check_zero(tmp: Path, *, tol: float) -> dict[str, Any]:
    grid, groups, dp_cp = _layout(1, 1, False)
    config = get_preset(PRESET).replace(zero_init_output=False)
    zmodel = build_dit(config, groups=groups, seed=9)
    rmodel = build_dit(config, groups=groups, seed=9)
    one = build_dit(config, seed=9)  # one rank, the replicas' shares accumulated
    zopt = make_sharded_adamw(zmodel.parameters(), dp_cp, lr=LR, weight_decay=0.1)
    ropt = torch.optim.AdamW(
        rmodel.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1, foreach=False
    )
    oopt = torch.optim.AdamW(
        one.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1, foreach=False
    )
    reducer = GradReducer(zmodel, groups, dp_cp, bucket_mb=0.01)
    replica, dp, per = grid.coords(dist.get_rank())["dp"], grid.dp, 2
    batches = [_samples(dp * per, seed=200 + step) for step in range(3)]

    def zero_step(model: nn.Module, opt: torch.optim.Optimizer, red: GradReducer, k: int) -> None:
        opt.zero_grad(set_to_none=False)
        _loss(model, batches[k][replica * per : (replica + 1) * per], dp * per)[0].backward()
        red.finish()
        opt.step()

    step_errs = []
    for k in range(3):
        zero_step(zmodel, zopt, reducer, k)
        for p, q in zip(rmodel.parameters(), zmodel.parameters(), strict=True):
            p.grad = q.grad.clone()  # type: ignore[union-attr]
        ropt.step()
        oopt.zero_grad(set_to_none=False)
        for r in range(dp):  # the replicas' shares as micro-batches of one rank
            _loss(one, batches[k][r * per : (r + 1) * per], dp * per)[0].backward()
        oopt.step()
        step_errs.append(
            {
                "vs_replicated_adamw": _max_err(zmodel, rmodel, grads=False)[0],
                "vs_one_rank_adamw": _max_err(zmodel, one, grads=False)[0],
            }
        )
        if k == 1:  # checkpoint after two steps (sharded and replicated)
            dcp.save(state_dict(zmodel, zopt, k, tp_rank=0, tp_size=1), checkpoint_id=tmp / "z")
            dcp.save(state_dict(rmodel, ropt, k, tp_rank=0, tp_size=1), checkpoint_id=tmp / "r")
    held = optimizer_state_bytes(zopt) / max(1, optimizer_state_bytes(ropt))
    # One rank, the whole batch in one forward: the gradients differ in rounding only.
    whole = build_dit(config, seed=9)
    _loss(whole, batches[0], dp * per)[0].backward()
    check = build_dit(config, groups=groups, seed=9)
    _loss(check, batches[0][replica * per : (replica + 1) * per], dp * per)[0].backward()
    red0 = GradReducer(check, groups, dp_cp, bucket_mb=0.01)
    red0.finish()
    red0.remove()
    whole_batch_grad_err = _max_err(check, whole, grads=True)[0]

    def resumed(path: Path, sharded: bool) -> float:
        m = build_dit(config, groups=groups, seed=123)  # other weights: the load must restore
        opt = (
            make_sharded_adamw(m.parameters(), dp_cp, lr=LR, weight_decay=0.1)
            if sharded
            else torch.optim.AdamW(
                m.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1, foreach=False
            )
        )
        state = state_dict(m, opt, -1, tp_rank=0, tp_size=1)
        dcp.load(state, checkpoint_id=path)
        assert int(state["meta/step"]) == 1
        red = GradReducer(m, groups, dp_cp, bucket_mb=0.01)
        zero_step(m, opt, red, 2)
        red.remove()
        return _max_err(m, zmodel, grads=False)[0]

    resume = {
        "sharded_into_sharded": resumed(tmp / "z", True),
        "sharded_into_replicated": resumed(tmp / "z", False),
        "replicated_into_sharded": resumed(tmp / "r", True),
    }
    exact = _all_max([*(e["vs_replicated_adamw"] for e in step_errs), *resume.values()])
    close = _all_max([e["vs_one_rank_adamw"] for e in step_errs])
    rounding = _all_max([whole_batch_grad_err])[0]
    ok = max(exact) == 0.0 and max(close) <= tol and rounding <= WHOLE_BATCH_TOL and held < 0.75
    return {
        "check": "zero",
        "grid": _grid(grid),
        "steps": step_errs,
        "whole_batch_grad_err": whole_batch_grad_err,
        "resume_err": resume,
        "state_bytes_vs_replicated": held,
        "ok": ok,
    }


def check_recompute(tp: int, cp: int, sp: bool) -> dict[str, Any]:
    """Selective and full recompute on a parallel layout: the gradients of no recompute,
    bitwise (megatron's parallel linears save their inputs through ``save_for_backward``,
    which the selective mode's freed storage must survive)."""
    grid, groups, _ = _layout(tp, cp, sp)
    config = get_preset(PRESET).replace(zero_init_output=False)
    data = _samples(2, seed=300)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for mode in ("none", "selective", "full"):
        model = build_dit(config, groups=groups, seed=11)
        apply_recompute(model, mode)
        _loss(model, data, 2)[0].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    errs = {
        mode: max(_rel(grads[mode][n], g) for n, g in grads["none"].items())
        for mode in ("selective", "full")
    }
    worst = _all_max(list(errs.values()))
    return {"check": "recompute", "grid": _grid(grid), "grad_err": errs, "ok": max(worst) == 0.0}


def launch(nproc: int, *args: str, timeout_s: float = 240.0) -> tuple[int, list[Any], str]:
    """Run this module on ``nproc`` local ranks under ``torchrun`` (what the tests do):
    (exit status, rank 0's JSON rows, the end of stderr). Loopback, a free port."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "step_infra.train.sharding_check", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, rows, proc.stderr[-3000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checks", nargs="+", choices=["grad_sync", "zero", "recompute"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    ap.add_argument("--bucket-mb", type=float, default=0.01, help="small: several buckets")
    ap.add_argument("--tmp", type=Path, help="a directory every rank sees (zero's checkpoints)")
    ap.add_argument("--tol", type=float, default=1e-6)
    args = ap.parse_args(argv)
    if "zero" in args.checks and args.tmp is None:
        ap.error("the zero check needs --tmp DIR for its checkpoints")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    failed = False
    for name in args.checks:
        if name == "grad_sync":
            result = check_grad_sync(
                args.tp, args.cp, args.sp, tol=args.tol, bucket_mb=args.bucket_mb
            )
        elif name == "zero":
            result = check_zero(args.tmp, tol=args.tol)
        else:
            result = check_recompute(args.tp, args.cp, args.sp)
        failed |= not result["ok"]
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""Run under ``torchrun``: does a parallel DiT match the one-rank DiT, outputs and gradients?

Each layout named on the command line is built with the same seed as a one-rank reference,
run forward and backward on the same batch (each data-parallel rank on its slice),
gradients finalized, and compared: outputs slice by slice, gradients of tensor-parallel
weights against the matching slice of the reference gradient. Rank 0 prints one JSON line
per layout; the exit status is 1 if any exceeds the tolerance.

Layout names: ``tp<n>``, ``cp<n>u`` / ``cp<n>r`` (Ulysses / ring), ``pp<n>`` with ``v<n>``
virtual stages per rank, ``dp<n>``, ``sp`` (sequence parallel), in that order, and
``@<schedule>`` to pick the pipeline schedule: ``tp2sp``, ``cp2r``, ``pp2``, ``pp2v2``,
``tp2pp2dp2``, ``tp2cp2rpp2sp``, ``pp2v2@zero_bubble``. Ranks follow
:class:`~step_infra.topology.ProcessGrid` (``dp x pp x cp x tp``, tp fastest). A layout
that names ``pp`` runs through :func:`~step_infra.models.pipeline.build_pipeline` with
``--microbatches`` micro-batches per data-parallel rank and the streaming trainer's loss
(per-sample MSE summed over the global batch); the others run ``DiT.forward`` directly.
The reference's depth is raised to ``pp * vpp`` blocks when the preset has fewer.

Pipelined layouts also check the cut itself: a pipeline that ran the whole model on every
rank would still give the right numbers, so each rank counts the blocks it ran (forward
hooks) and the parameters it holds, and ``ok`` is false unless every rank ran and holds
exactly its stages' share. ``--whole-model LAYOUT`` is the negative control that must fail
it: every pp rank builds and runs the whole model (the numbers still match).

Tolerance: fp32 throughout, only the order of reductions differs (all-reduce, split
matmuls, LSE merges, micro-batch sums), so relative errors sit near 1e-7..1e-6; ``--tol``
(default 1e-5, relative to the largest reference value of each tensor) leaves margin
without hiding a real bug, which shows up as O(1e-2) or larger differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from step_infra.emulator.plan import Plan
from step_infra.models.config import DiTConfig, get_preset
from step_infra.models.dit import DiT, build_dit
from step_infra.models.parallel import (
    ParallelGroups,
    SingleRankGroup,
    clip_grad_norm,
    finalize_grads,
)
from step_infra.models.pipeline import (
    SCHEDULES,
    DiTPipeline,
    build_pipeline,
    stage_layers,
    summed_mse,
)
from step_infra.topology import ProcessGrid

_LAYOUT = re.compile(
    r"^(?:tp(\d))?(?:cp(\d)([ur]))?(?:pp(\d)(?:v(\d))?)?(?:dp(\d))?(sp)?(?:@([a-z0-9_]+))?$"
)
SEED = 7


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """A parsed layout name; ``schedule`` is None when it is not pipelined."""

    grid: ProcessGrid
    sequence_parallel: bool = False
    cp_kind: str = "ulysses"
    vpp: int = 1
    schedule: str | None = None


def default_schedule(vpp: int) -> str:
    return "interleaved_1f1b" if vpp > 1 else "1f1b"


def parse_layout(name: str) -> Layout:
    """``tp2sp`` -> tp=2 with sequence parallel; ``cp2r`` -> ring CP; ``pp2v2`` -> two
    pipeline ranks with two chunks each (interleaved 1F1B unless ``@schedule`` says)."""
    m = _LAYOUT.match(name)
    if not m or not any(m.groups()):
        raise ValueError(
            f"layout {name!r} not understood; e.g. tp2, tp2sp, cp2u, cp2r, tp2dp2, pp2, "
            "pp2v2, tp2pp2dp2, tp2cp2rpp2sp, pp2@gpipe"
        )
    tp, cp, kind, pp, vpp, dp, sp, schedule = m.groups()
    if vpp and not pp:
        raise ValueError(f"layout {name!r}: v<n> (virtual stages) needs pp<n> before it")
    if schedule and not pp:
        raise ValueError(f"layout {name!r}: @{schedule} needs a pipeline (pp<n>)")
    if schedule and schedule not in SCHEDULES:
        raise ValueError(f"layout {name!r}: schedule {schedule!r} not in {sorted(SCHEDULES)}")
    grid = ProcessGrid(tp=int(tp or 1), cp=int(cp or 1), pp=int(pp or 1), dp=int(dp or 1))
    v = int(vpp or 1)
    return Layout(
        grid=grid,
        sequence_parallel=bool(sp),
        cp_kind="ring" if kind == "r" else "ulysses",
        vpp=v,
        schedule=(schedule or default_schedule(v)) if pp else None,
    )


def _pipelined(name: str) -> Layout:
    layout = parse_layout(name)
    if layout.schedule is None:
        raise ValueError(f"--whole-model {name}: the negative control needs a pp<n> layout")
    return layout


def _batch(config: DiTConfig, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, config.in_channels, 2, 4, 4, generator=g)
    t = torch.rand(batch, generator=g)
    ts = torch.randn(batch, 5, config.text_dim_short, generator=g)
    tl = torch.randn(batch, 3, config.text_dim_long, generator=g)
    sl = torch.tensor([(5, 3, 2, 4)[i % 4] for i in range(batch)])
    ll = torch.tensor([(1, 3, 2, 0)[i % 4] for i in range(batch)])
    target = torch.randn(batch, config.in_channels, 2, 4, 4, generator=g)
    return x, t, ts, sl, tl, ll, target


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _reference(config: DiTConfig, inputs: tuple[torch.Tensor, ...]) -> tuple[DiT, torch.Tensor]:
    """The one-rank DiT, its output and gradients of the batch-mean MSE."""
    one = SingleRankGroup()
    ref = build_dit(config, groups=ParallelGroups(tp=one, cp=one, dp=one, pp=one), seed=SEED)
    *args, target = inputs
    out = ref(*args)
    torch.nn.functional.mse_loss(out, target).backward()
    return ref, out.detach()


def _grad_error(model: nn.Module, ref: nn.Module, groups: ParallelGroups) -> tuple[float, str]:
    """Largest relative gradient error over the parameters ``model`` holds (reference names)."""
    worst, name_of_worst = 0.0, ""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        assert p.grad is not None and r is not None, name
        if getattr(p, "tensor_model_parallel", False) and groups.tp_size > 1:
            r = r.chunk(groups.tp_size, dim=p.partition_dim)[groups.tp_rank]  # type: ignore[attr-defined]
        e = _rel(p.grad, r)
        if e > worst:
            worst, name_of_worst = e, name
    return worst, name_of_worst


def _row(layout: Layout, errs: dict[str, float], worst: str, tol: float) -> dict[str, object]:
    """The JSON row: each error's maximum over all ranks, ``ok`` if all are within ``tol``."""
    t = torch.tensor(list(errs.values()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {
        "grid": dict(zip(("dp", "pp", "cp", "tp"), layout.grid.shape, strict=True)),
        "sequence_parallel": layout.sequence_parallel,
        "cp_kind": layout.cp_kind,
        **{f"max_rel_err_{k}": float(v) for k, v in zip(errs, t, strict=True)},
        "worst_grad_on_rank0": worst,
        "ok": bool(t.max() <= tol),
    }


def run_layout(
    layout: Layout,
    *,
    tol: float,
    batch: int = 4,
    preset: str = "micro-dit",
    finalize: bool = True,
    n_microbatches: int = 2,
    whole_model: bool = False,
) -> dict[str, object]:
    """Check one layout against the one-rank reference (every rank calls this)."""
    if layout.schedule is not None:
        return _run_pipelined(
            layout,
            tol=tol,
            batch=batch,
            preset=preset,
            finalize=finalize,
            n_microbatches=n_microbatches,
            whole_model=whole_model,
        )
    config = get_preset(preset).replace(zero_init_output=False)
    inputs = _batch(config, batch)
    ref, ref_out = _reference(config, inputs)
    grid = layout.grid
    groups = ParallelGroups.create(
        grid, sequence_parallel=layout.sequence_parallel, cp_kind=layout.cp_kind
    )
    model = build_dit(config, groups=groups, seed=SEED)
    local = _dp_slice(grid, batch)
    *args, target = (a[local] for a in inputs)
    out = model(*args)
    torch.nn.functional.mse_loss(out, target).backward()
    if finalize:
        finalize_grads(model, groups)
    grad_err, worst = _grad_error(model, ref, groups)
    errs = {"output": _rel(out.detach(), ref_out[local]), "grad": grad_err}
    return _row(layout, errs, worst, tol)


def _dp_slice(grid: ProcessGrid, batch: int) -> slice:
    if batch % grid.dp:
        raise ValueError(f"batch {batch} does not split over dp={grid.dp}")
    dp_rank = grid.coords(dist.get_rank())["dp"]
    return slice(dp_rank * batch // grid.dp, (dp_rank + 1) * batch // grid.dp)


def _run_pipelined(
    layout: Layout,
    *,
    tol: float,
    batch: int,
    preset: str,
    finalize: bool,
    n_microbatches: int,
    whole_model: bool,
) -> dict[str, object]:
    grid, vpp = layout.grid, layout.vpp
    assert layout.schedule is not None
    base = get_preset(preset)
    config = base.replace(zero_init_output=False, num_layers=max(base.num_layers, grid.pp * vpp))
    inputs = _batch(config, batch)
    ref, ref_out = _reference(config, inputs)
    ref_loss = torch.nn.functional.mse_loss(ref_out, inputs[-1])  # = summed_mse over the batch
    groups = ParallelGroups.create(
        grid, sequence_parallel=layout.sequence_parallel, cp_kind=layout.cp_kind
    )
    built_for = dataclasses.replace(groups, pp=SingleRankGroup()) if whole_model else groups
    pipe = build_pipeline(
        config,
        built_for,
        n_microbatches=n_microbatches,
        loss_fn=summed_mse,
        seed=SEED,
        vpp=1 if whole_model else vpp,
        schedule=layout.schedule,
    )
    calls = _count_block_calls(pipe)
    local = _dp_slice(grid, batch)
    *args, target = (a[local] for a in inputs)
    losses: list[torch.Tensor] = []
    out = pipe.step(*args, target=target, losses=losses, loss_kwargs={"global_batch": batch})
    loss = torch.stack([x.detach() for x in losses]).sum().view(1) if losses else torch.zeros(1)
    if finalize:  # the streaming trainer's reduction: sums over replicas, loss riding along
        finalize_grads(pipe.held, groups, dp_mean=False, ride_along=[loss])
    errs = {"output": 0.0, "grad": 0.0, "loss": 0.0}  # output and loss: on the last stage
    if pipe.has_last:
        assert out is not None
        errs.update(output=_rel(out.detach(), ref_out[local]), loss=_rel(loss, ref_loss.view(1)))
    errs["grad"], worst = _grad_error(pipe.held, ref, groups)
    # each pp rank holds other parameters: the norm must sum over the pipeline too
    norm = clip_grad_norm(pipe.held, pipe.groups, max_norm=0.0)
    ref_norm = clip_grad_norm(ref, None, max_norm=0.0)
    errs["grad_norm"] = abs(norm - ref_norm) / ref_norm
    row = _row(layout, errs, worst, tol)
    share = _share(pipe, ref, groups, vpp, calls)
    row.update(vpp=vpp, schedule=layout.schedule, n_microbatches=n_microbatches, **share)
    row["ok"] = bool(row["ok"]) and bool(share["share_ok"])
    return row


def _count_block_calls(pipe: DiTPipeline) -> Counter[int]:
    """Forward calls per block index on this rank (hooks on the blocks it holds)."""
    calls: Counter[int] = Counter()
    for key, block in pipe.held.layers.items():
        block.register_forward_hook(lambda *_, i=int(key): calls.update([i]))
    return calls


def _share(
    pipe: DiTPipeline, ref: DiT, groups: ParallelGroups, vpp: int, calls: Counter[int]
) -> dict[str, object]:
    """Did this rank run and hold only its stages' blocks (and embed / head where due)?

    The expected share comes from the grid, not from ``pipe``: chunks ``pp_rank + k * pp``
    of the layout ``stage_layers(num_layers, pp * vpp)``, which ``build_pipeline`` uses."""
    pp = groups.pp_size
    cut = stage_layers(ref.config.num_layers, pp * vpp)
    ids = [groups.pp_rank + k * pp for k in range(vpp)]
    blocks = sorted(i for v in ids for i in cut[v])
    prefixes = [f"layers.{i}." for i in blocks]
    prefixes += ["embed."] * (0 in ids) + ["head."] * (pp * vpp - 1 in ids)
    ref_sizes = {n: p.numel() for n, p in ref.named_parameters()}
    expected = {n for n in ref_sizes if n.startswith(tuple(prefixes))}
    held = {n for n, _ in pipe.held.named_parameters()}
    ran = sorted(calls)
    mine = {
        "blocks_run": ran,
        "block_calls": sum(calls.values()),
        "params_held_fraction": round(sum(ref_sizes[n] for n in held) / sum(ref_sizes.values()), 4),
        "ok": ran == blocks and held == expected,
    }
    everyone: list[dict[str, object] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {
        "blocks_run_per_rank": [r["blocks_run"] for r in everyone if r],
        "block_calls_per_rank": [r["block_calls"] for r in everyone if r],
        "params_held_fraction_per_rank": [r["params_held_fraction"] for r in everyone if r],
        "share_ok": all(r and r["ok"] for r in everyone),
    }


def strategy_layout(plan: Plan, world_size: int) -> tuple[Layout, int]:
    """The plan's layout and the micro-batches per data-parallel rank to check it with
    (the plan's count, kept between ``pp`` and 8 for the CPU)."""
    s = plan.strategy
    grid = plan.grid(world_size)
    schedule = default_schedule(s.vpp) if grid.pp > 1 else None
    planned = s.global_batch // (s.micro_batch * grid.dp)
    layout = Layout(
        grid=grid,
        sequence_parallel=s.sequence_parallel,
        cp_kind=s.cp_kind,
        vpp=s.vpp,
        schedule=schedule,
    )
    return layout, max(grid.pp, min(planned, 8))


def run_strategy(plan: Plan, *, tol: float) -> dict[str, object]:
    """Build the plan's preset (if small enough for the CPU) with its layout and check it,
    pipeline stages included (one sample per micro-batch)."""
    preset = plan.preset if plan.preset in ("tiny-dit", "micro-dit") else "micro-dit"
    layout, n_mb = strategy_layout(plan, dist.get_world_size())
    batch = n_mb * layout.grid.dp if layout.schedule is not None else 4
    result = run_layout(layout, tol=tol, preset=preset, batch=batch, n_microbatches=n_mb)
    result["strategy_preset"] = plan.preset
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("layouts", nargs="*", help="e.g. tp2 tp2sp cp2u cp2r dp2 pp2 pp2v2 tp2pp2dp2")
    ap.add_argument("--strategy", help="a strategy TOML from `step-infra plan`")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=4, help="global batch of the check")
    ap.add_argument(
        "--microbatches", type=int, default=2, help="micro-batches per data-parallel rank (pp)"
    )
    ap.add_argument(
        "--no-finalize",
        action="store_true",
        help="negative control: skip the gradient reduction, so the check must fail",
    )
    ap.add_argument(
        "--whole-model",
        action="append",
        default=[],
        metavar="LAYOUT",
        help="negative control (repeatable): also check LAYOUT with every pp rank building "
        "and running the whole model (no stage split); its row, named LAYOUT:whole-model, "
        "must fail the share check",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    failed = False
    jobs: list[tuple[str, Plan | Layout]] = [(name, parse_layout(name)) for name in args.layouts]
    jobs += [(f"{name}:whole-model", _pipelined(name)) for name in args.whole_model]
    if args.strategy:
        jobs.append(("strategy", Plan.load(args.strategy)))
    for name, job in jobs:
        if isinstance(job, Plan):
            result = run_strategy(job, tol=args.tol)
        else:
            result = run_layout(
                job,
                tol=args.tol,
                batch=args.batch,
                finalize=not args.no_finalize,
                n_microbatches=args.microbatches,
                whole_model=name.endswith(":whole-model"),
            )
        result["layout"] = name
        failed |= not result["ok"]
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

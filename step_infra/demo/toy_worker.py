"""A tiny plain-torch training job for the elastic controller's end-to-end runs.

Started by ``torchrun`` (one process per agent) through :func:`run_elastic_job`. It trains a
two-layer MLP on a synthetic regression task with gloo, records a compute-only section and
the arrival at the gradient all-reduce, checkpoints through its session (the same
distributed checkpoint as the DiT job), and resumes from the latest one after a restart. The *global* batch is fixed: each rank runs
``global_batch / (micro_batch * world_size)`` micro-batches of gradient accumulation, and
sample ``i`` of step ``s`` is the same tensor whatever the world size, so the loss curve
after a resize continues the one before it.

    python -m step_infra.demo.toy_worker --steps 60 --compute-s 0.1

(only meaningful under ``torchrun`` with the variables of
:mod:`~step_infra.elastic.worker_env`; the controller's tests start it).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist
from torch import nn

from step_infra.elastic.checkpoint import state_dict
from step_infra.elastic.session import ElasticSession

DIM = 16
TOY_WORKER = ("-m", "step_infra.demo.toy_worker")  # ElasticConfig.worker_args for this job


def _samples(step: int, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic samples: the same (x, y) for a (step, index) on any world size."""
    xs, ys = [], []
    true_w = torch.linspace(-1.0, 1.0, DIM)
    for i in indices:
        g = torch.Generator().manual_seed(step * 100_003 + i)
        x = torch.randn(DIM, generator=g)
        xs.append(x)
        ys.append((x @ true_w).tanh() + 0.01 * torch.randn(1, generator=g).squeeze())
    return torch.stack(xs), torch.stack(ys).unsqueeze(1)  # (B, DIM), (B, 1)


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer, identically initialised on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def accumulate(
    model: nn.Module, step: int, indices: list[int], *, micro_batch: int, global_batch: int
) -> float:
    """Forward/backward over ``indices`` in micro-batches; grads scaled for the global batch.

    Returns the summed (not averaged) loss of these samples.
    """
    total = 0.0
    for m in range(0, len(indices), micro_batch):
        x, y = _samples(step, indices[m : m + micro_batch])
        loss = nn.functional.mse_loss(model(x), y, reduction="sum")
        (loss / global_batch).backward()
        total += float(loss.detach())
    return total


def reference_losses(steps: int, *, global_batch: int = 24, micro_batch: int = 4) -> list[float]:
    """Loss curve of the same job on one process, no faults: what a resumed run must match."""
    model, opt = make_model()
    out = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = accumulate(
            model,
            step,
            list(range(global_batch)),
            micro_batch=micro_batch,
            global_batch=global_batch,
        )
        opt.step()
        out.append(total / global_batch)
    return out


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tiny elastic training job")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--global-batch", type=int, default=24)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--compute-s", type=float, default=0.1, help="simulated compute per step")
    p.add_argument("--checkpoint-every", type=int, default=5)
    # Fault injection for the controller's tests: crash or hang at a step, or slow saves.
    p.add_argument("--crash-at-step", type=int, default=None)
    p.add_argument("--hang-at-step", type=int, default=None)
    p.add_argument("--save-delay-s", type=float, default=0.0)
    return p.parse_args()


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dist.init_process_group("gloo")
    session = ElasticSession.begin(global_batch=args.global_batch, micro_batch=args.micro_batch)
    rank, world, env = session.rank, session.world_size, session.env
    model, opt = make_model()
    state = state_dict(model, opt, -1, tp_rank=0, tp_size=1)
    session.load(state)
    with session.recorder() as rec:
        for step in range(session.start_step, args.steps):
            rec.begin_step(step)
            if step == args.crash_at_step and rank == 0:
                raise RuntimeError(f"injected crash at step {step}")
            if step == args.hang_at_step and rank == 0:
                time.sleep(3600)  # injected hang: the controller's step timeout must fire
            with rec.section("compute"):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                mine = list(range(rank, args.global_batch, world))  # grad_accum micro-batches
                local = accumulate(
                    model, step, mine, micro_batch=args.micro_batch, global_batch=args.global_batch
                )
                # Simulated accelerator time, stretched on a node made slow on purpose.
                budget = args.compute_s * env.slowdown(step)
                time.sleep(max(0.0, budget - (time.perf_counter() - t0)))
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            session.at_collective(step)
            with rec.collective("grad_allreduce"):
                flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([local])])
                dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            opt.step()
            loss = float(flat[-1]) / args.global_batch
            session.step_done(rec, step, loss=loss, tokens=args.global_batch / world)
            if step % args.checkpoint_every == 0:
                if rank == 0 and args.save_delay_s:  # a slow file system (injected)
                    session.heartbeat.beat(step=step, phase="save")
                    time.sleep(args.save_delay_s)
                session.checkpoint(step, state, wait=True)
    session.done(args.steps - 1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One DiT trainer rank of a streaming job, started by ``torchrun`` under the elastic controller.

Reads latents and text embeddings only from the ``latents`` pipe (spray across data-parallel
replicas; both tensor-parallel ranks of a replica receive the same items), trains with flow
matching, records telemetry, and checkpoints with torch.distributed.checkpoint. Everything a
sample contributes (its noise, its time, whether its caption is dropped) is drawn from a
generator seeded by the sample id, and every step trains exactly the ids
``[step * global_batch, (step + 1) * global_batch)`` (see :mod:`step_infra.data.stream`), so
where a sample was trained never changes what it does to the model.

Gradients: each replica sums ``per-sample loss / global_batch`` over the samples it got (it may
get more or fewer than ``global_batch / dp``), and one flat all-reduce *sums* over replicas:
the exact mean over the global batch, whatever the split.

    torchrun ... -m step_infra.train.job.worker     (environment from the controller)
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn

from step_infra.data.servers import LATENT_PIPE, TOKEN_ENV, wait_for_producers
from step_infra.data.stream import Sample, StepStream
from step_infra.models.config import get_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups, all_reduce_coalesced, tp_partial_grads
from step_infra.telemetry.session import ElasticSession
from step_infra.topology import ProcessGrid
from step_infra.train.flow import FlowConfig, interpolate, sample_time
from step_infra.train.job.checkpoint import Checkpointer, gather_full_state, state_dict
from step_infra.train.job.config import JobConfig
from step_infra.train.loop import pad_features

log = logging.getLogger(__name__)

REGISTRY_ENV = "STEP_REGISTRY"
FULL_MODEL = "final_model.pt"


def build_model(cfg: JobConfig, groups: ParallelGroups | None = None) -> nn.Module:
    """The job's DiT: the preset with the VAE's latent channels and the encoders' widths."""
    config = get_preset(cfg.dit_preset).replace(
        in_channels=cfg.vae.latent_channels,
        text_dim_short=cfg.text_dim_short,
        text_dim_long=cfg.text_dim_long,
    )
    return build_dit(config, groups=groups, seed=cfg.seed)


def sample_generator(cfg: JobConfig, sample_id: int) -> torch.Generator:
    """The randomness of one sample (noise, time, caption dropout), independent of ranks."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + sample_id)


def _inputs(cfg: JobConfig, chunk: list[Sample]) -> dict[str, torch.Tensor]:
    x0 = torch.stack([s.tensors["latent"] for s in chunk])
    ts, eps, shorts, longs = [], [], [], []
    flow = FlowConfig()
    for s in chunk:
        g = sample_generator(cfg, s.id)
        ts.append(sample_time(1, flow, g))
        eps.append(torch.randn(s.tensors["latent"].shape, generator=g))
        drop = float(torch.rand((), generator=g)) < cfg.caption_dropout
        short, long_ = s.tensors["text_short"], s.tensors["text_long"]
        shorts.append(torch.zeros(1, short.shape[1]) if drop else short)
        longs.append(torch.zeros(1, long_.shape[1]) if drop else long_)
    t = torch.cat(ts)
    text_short, short_lengths = pad_features(shorts)
    text_long, long_lengths = pad_features(longs)
    e = torch.stack(eps)
    return {
        "x_t": interpolate(x0, e, t),
        "target": e - x0,
        "t": t,
        "text_short": text_short,
        "short_lengths": short_lengths,
        "text_long": text_long,
        "long_lengths": long_lengths,
    }


def _forward_backward(model: nn.Module, cfg: JobConfig, samples: list[Sample]) -> float:
    """Sum of per-sample losses over ``samples``; gradients of ``sum / global_batch``."""
    total = 0.0
    for i in range(0, len(samples), cfg.micro_batch):
        b = _inputs(cfg, samples[i : i + cfg.micro_batch])
        pred = model(
            b["x_t"], b["t"], b["text_short"], b["short_lengths"], b["text_long"], b["long_lengths"]
        )
        per_sample = (pred - b["target"]).square().flatten(1).mean(1)
        (per_sample.sum() / cfg.global_batch).backward()
        total += float(per_sample.detach().sum())
    return total


def _sharded(p: nn.Parameter, tp: int) -> bool:
    return tp > 1 and bool(getattr(p, "tensor_model_parallel", False))


def reduce_gradients(model: nn.Module, groups: ParallelGroups, loss_sum: float) -> float:
    """Sum gradients (and the loss) over replicas in one flat all-reduce; returns the summed
    loss. Gradients that are partial per TP rank are first summed over TP, also in one."""
    grads = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_coalesced(tp_partial_grads(model, groups), groups.tp)
    loss = torch.tensor([loss_sum])
    if groups.dp_size > 1:
        all_reduce_coalesced([*grads, loss], groups.dp)
    return float(loss)


def clip_gradients(model: nn.Module, groups: ParallelGroups, max_norm: float) -> float:
    """Clip by the global norm: TP shards summed over the TP group, replicas counted once."""
    sharded = torch.zeros(1)
    replicated = torch.zeros(1)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().square().sum()
        if _sharded(p, groups.tp_size):
            sharded += sq
        else:
            replicated += sq
    if groups.tp_size > 1:
        dist.all_reduce(sharded, group=groups.tp)
    norm = float((sharded + replicated).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def learning_rate(cfg: JobConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from step_infra.rpc.consumer import Consumer, ConsumerConfig
    from step_infra.rpc.registry import RegistryClient

    run_dir = os.environ["STEP_INFRA_RUN_DIR"]
    cfg = JobConfig.load(run_dir)  # type: ignore[arg-type]
    world, rank = dist.get_world_size(), dist.get_rank()
    # grad_accum here is only informational: replicas take as many samples as they hold.
    session = ElasticSession.begin(global_batch=cfg.global_batch, micro_batch=1)
    grid = ProcessGrid(tp=cfg.tp, dp=world // cfg.tp)
    groups = ParallelGroups.create(grid)
    replica = grid.coords(rank)["dp"]
    model = build_model(cfg, groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), foreach=False)
    ckpt = Checkpointer(session.env.run_dir / "checkpoints")
    state = state_dict(model, optimizer, -1, tp_rank=groups.tp_rank, tp_size=groups.tp_size)

    def load() -> dict[str, int] | None:
        step = ckpt.load(state)
        return None if step is None else {"step": step}

    session.load(loader=load)
    registry = RegistryClient(os.environ[REGISTRY_ENV], os.environ.get(TOKEN_ENV, ""))
    addresses = wait_for_producers(registry, LATENT_PIPE, cfg.vae_servers)
    consumer = Consumer(
        LATENT_PIPE,
        addresses,
        group=f"gen{session.generation}.dp{replica}",
        member=f"tp{groups.tp_rank}",
        config=ConsumerConfig(prefetch=cfg.prefetch, ack="manual", group_size=cfg.tp),
        registry=registry,
    )
    stream = StepStream(
        consumer,
        global_batch=cfg.global_batch,
        replica=replica,
        replica_of_rank=[grid.coords(r)["dp"] for r in range(world)],
        position=session.start_step * cfg.global_batch,
    )
    nominal = cfg.global_batch / grid.dp
    (session.env.run_dir / "ledger").mkdir(exist_ok=True)
    ledger = (session.env.run_dir / "ledger" / f"g{session.generation}-r{rank}.jsonl").open("a")
    with session.recorder() as rec:
        for step in range(session.start_step, cfg.steps):
            rec.begin_step(step)
            samples, timing = stream.batch(step)
            if groups.tp_rank == 0:  # the replica's record of what it trained (audited later)
                ledger.write(json.dumps({"step": step, "generation": session.generation,
                    "node": session.env.node, "replica": replica,
                    "ids": [s.id for s in samples]}) + "\n")  # fmt: skip
                ledger.flush()
            rec.record_section("data_wait_s", timing.stall_s)
            rec.record_section("batch_sync", timing.sync_s)
            # "compute" is this rank's CPU time for its share: what CUDA events measure on a
            # GPU (time the device worked), not time spent waiting for a core that the other
            # processes of this shared host hold; wall-clock compute here varies +-40 %.
            cpu0 = time.thread_time()
            optimizer.zero_grad(set_to_none=False)
            local = _forward_backward(model, cfg, samples)
            busy = time.thread_time() - cpu0
            slow = session.env.slowdown(step)
            if slow > 1.0:  # fault injection: this node's device is `slow` times slower
                time.sleep(busy * (slow - 1.0))
            if samples:  # normalized to an equal share (replicas get uneven sample counts)
                rec.record_section("compute", busy * slow * nominal / len(samples))
            session.at_collective(step)
            with rec.collective("grad_allreduce"):
                total = reduce_gradients(model, groups, local)
            clip_gradients(model, groups, cfg.grad_clip)
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(cfg, step)
            optimizer.step()
            loss = total / cfg.global_batch
            session.step_done(rec, step, loss=loss, tokens=float(len(samples)))
            durable = ckpt.poll()
            if durable is not None:
                _committed(session, stream, cfg, durable)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                session.heartbeat.beat(step=step, phase="save")
                state["meta/step"].fill_(step)
                ckpt.save_async(state, step)
                session.heartbeat.beat(step=step, phase="step")
    last = cfg.steps - 1
    if session.start_step <= last:
        session.heartbeat.beat(step=last, phase="save")  # the final save: checkpoint timeout
        durable = ckpt.wait()
        if durable is not None:
            _committed(session, stream, cfg, durable)
        state["meta/step"].fill_(last)
        _committed(session, stream, cfg, ckpt.save(state, last))
    full = gather_full_state(model, groups.tp, groups.tp_size)
    if rank == 0:
        tmp = session.env.run_dir / f".{FULL_MODEL}.tmp"
        torch.save(full, tmp)
        tmp.replace(session.env.run_dir / FULL_MODEL)
    session.done(last)
    ledger.close()
    consumer.close()
    registry.close()
    dist.barrier()
    dist.destroy_process_group()


def _committed(session: ElasticSession, stream: StepStream, cfg: JobConfig, step: int) -> None:
    """A checkpoint of ``step`` is durable: acknowledge what it covers, tell the controller."""
    acked = stream.commit((step + 1) * cfg.global_batch)
    if session.rank == 0:
        session.events.emit("checkpoint", step=step, acknowledged=acked, durable=True)


if __name__ == "__main__":
    main()

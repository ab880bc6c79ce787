"""One DiT trainer rank of a streaming job, started by ``torchrun`` under the elastic controller.

Reads latents and text embeddings only from the ``latents`` pipe (spray across data-parallel
replicas; every tp x cp x pp rank of a replica receives the same items), trains with flow
matching, records telemetry, and checkpoints through its elastic session. Everything a sample
contributes (its noise, its time, whether its caption is dropped) is drawn from a generator
seeded by the sample id, and every step trains exactly the ids
``[step * global_batch, (step + 1) * global_batch)`` (see :mod:`step_infra.data.stream`), so
where a sample was trained never changes what it does to the model.

Gradients: each replica sums ``per-sample loss / global_batch`` over the samples it got (it may
get more or fewer than ``global_batch / dp``), and one flat all-reduce *sums* over replicas
(:func:`~step_infra.models.parallel.finalize_grads` with ``dp_mean=False``): the exact mean
over the global batch, whatever the split. The loss is :func:`flow_matching_loss` and the
update :func:`~step_infra.train.loop.apply_update`, the same functions the recipes train with.
The plan's layout decides the rest: pipeline stages (:mod:`step_infra.models.pipeline`, the
last micro-batch padded with zero-weight copies), recompute, ZeRO-1 and the bucketed
:class:`~step_infra.train.grad_sync.GradReducer` in place of the one all-reduce.

The rank's life is three functions: :func:`setup` (process groups, model, session, stream),
:func:`train_step` and :func:`teardown`.

    torchrun ... -m step_infra.train.job.worker     (environment from the controller)
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from torch import nn

from step_infra.data.servers import LATENT_PIPE, TOKEN_ENV, wait_for_producers
from step_infra.data.stream import Sample, StepStream
from step_infra.elastic.checkpoint import gather_full_state, state_dict
from step_infra.elastic.session import ElasticSession
from step_infra.elastic.worker_env import RUN_DIR_ENV
from step_infra.models.config import DiTConfig, conditioned_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups, clip_grad_norm
from step_infra.models.pipeline import DiTPipeline, build_pipeline
from step_infra.models.recompute import apply_recompute
from step_infra.telemetry.recorder import Recorder
from step_infra.train.flow import FlowConfig, flow_matching_loss, interpolate, sample_time
from step_infra.train.grad_sync import GradReducer, make_dp_cp_group
from step_infra.train.job.config import JobConfig, compute_precision, pipeline_schedule
from step_infra.train.loop import apply_update, pad_features
from step_infra.train.zero import make_sharded_adamw

log = logging.getLogger(__name__)

REGISTRY_ENV = "STEP_REGISTRY"
FULL_MODEL = "final_model.pt"


def job_dit_config(cfg: JobConfig) -> DiTConfig:
    """The job's DiT config: the preset with the VAE's latent channels and the encoders'
    widths."""
    return conditioned_preset(
        cfg.dit_preset,
        latent_channels=cfg.vae.latent_channels,
        text_dims=(cfg.text_dim_short, cfg.text_dim_long),
    )


def build_model(cfg: JobConfig, groups: ParallelGroups | None = None) -> nn.Module:
    """The job's whole DiT (without pipeline stages)."""
    return build_dit(job_dit_config(cfg), groups=groups, seed=cfg.seed)


def sample_generator(cfg: JobConfig, sample_id: int) -> torch.Generator:
    """The randomness of one sample (noise, time, caption dropout), independent of ranks."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + sample_id)


def _inputs(
    cfg: JobConfig, chunk: list[Sample], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """A micro-batch on ``device``: latents, per-sample time and noise (drawn on the CPU from
    the sample's generator, so they do not depend on the device), text with captions
    dropped."""
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
    text_short, short_lengths = pad_features([r.cpu() for r in shorts])
    text_long, long_lengths = pad_features([r.cpu() for r in longs])
    batch = {
        "x0": torch.stack([s.tensors["latent"].cpu() for s in chunk]),
        "t": torch.cat(ts),
        "eps": torch.stack(eps),
        "text_short": text_short,
        "short_lengths": short_lengths,
        "text_long": text_long,
        "long_lengths": long_lengths,
    }
    if device is None or device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_backward(
    model: nn.Module,
    cfg: JobConfig,
    samples: list[Sample],
    device: torch.device | None = None,
    reducer: GradReducer | None = None,
) -> float:
    """Sum of per-sample losses over ``samples``; gradients of ``sum / global_batch``.

    With a ``reducer``, all but the last micro-batch's backward only accumulate, and the last
    one starts the buckets' all-reduces while it runs."""
    total = 0.0
    mb = cfg.strategy.micro_batch
    starts = list(range(0, len(samples), mb))
    for i in starts:
        b = _inputs(cfg, samples[i : i + mb], device)
        text = (b["text_short"], b["short_lengths"], b["text_long"], b["long_lengths"])

        def velocity(
            x: torch.Tensor, t: torch.Tensor, text: tuple[torch.Tensor, ...] = text
        ) -> torch.Tensor:
            out: torch.Tensor = model(x, t, *text)
            return out

        last = i == starts[-1]
        sync = reducer.no_sync() if reducer is not None and not last else nullcontext()
        with sync, _autocast(cfg, device):
            per_sample = flow_matching_loss(
                velocity, b["x0"], config=FlowConfig(), t=b["t"], eps=b["eps"], reduce=False
            )
            (per_sample.float().sum() / cfg.global_batch).backward()
        total += float(per_sample.detach().sum())
    return total


def weighted_summed_mse(
    pred: torch.Tensor, packed: torch.Tensor, *, global_batch: int
) -> torch.Tensor:
    """The pipelined loss of one micro-batch: ``packed`` is the velocity target with each
    sample's weight as one extra channel (0 for the copies that pad the last micro-batch to
    the pipeline's fixed shape), so padding never changes the loss or the gradients."""
    target, weight = packed[:, :-1], packed[:, -1].flatten(1)[:, 0]
    per_sample = (pred.float() - target).square().flatten(1).mean(1)
    return (per_sample * weight).sum() / global_batch


def _pipeline_forward_backward(
    pipe: DiTPipeline, cfg: JobConfig, groups: ParallelGroups, samples: list[Sample],
    device: torch.device, reducer: GradReducer | None = None,
) -> float:  # fmt: skip
    """The pipelined step: the replica's samples in micro-batches of ``micro_batch`` (the last
    one padded with zero-weight copies), through the schedule. Every rank of the replica
    holds the same samples, so all stages agree on the shapes. Returns the sum of per-sample
    losses (known on the last stage; summed over the pipeline group so every rank has it).
    With a ``reducer``, a bucket's all-reduce starts once its gradients have accumulated all
    ``n`` micro-batches, inside the schedule's last backwards."""
    mb = cfg.strategy.micro_batch
    n = pipeline_microbatches(-(-len(samples) // mb), groups.pp_size)
    total = torch.zeros(1, device=device)
    if n:
        padded = samples + [samples[-1]] * (n * mb - len(samples))
        b = _inputs(cfg, padded, device)
        x0, eps, t = b["x0"], b["eps"].to(b["x0"].dtype), b["t"]
        weight = torch.zeros(n * mb, device=x0.device)
        weight[: len(samples)] = 1.0
        shape = (n * mb, 1, *x0.shape[2:])
        packed = torch.cat([eps - x0, weight.view(-1, *[1] * (x0.dim() - 1)).expand(shape)], 1)
        losses: list[torch.Tensor] = []
        pipe.set_microbatches(n)
        if reducer is not None:  # each gradient accumulates once per micro-batch
            reducer.expect_accumulations(n)
        with _autocast(cfg, device):
            pipe.step(interpolate(x0, eps, t), t, b["text_short"], b["short_lengths"],
                      b["text_long"], b["long_lengths"], target=packed, losses=losses,
                      return_outputs=False)  # fmt: skip
        if losses:
            total += torch.stack([loss.detach().float() for loss in losses]).sum()
    if groups.pp_size > 1:
        dist.all_reduce(total, group=groups.pp)
    return float(total) * cfg.global_batch


def pipeline_microbatches(needed: int, pp: int) -> int:
    """Micro-batches a pipelined step runs for ``needed`` of them (0 stays 0): at least one
    per stage, and a count torch's interleaved schedules take (a multiple of its rounds,
    ``n // pp``); the extra ones are zero-weight padding."""
    if needed == 0:
        return 0
    n = max(needed, pp)
    while n % max(1, n // pp):
        n += 1
    return n


def _autocast(cfg: JobConfig, device: torch.device | None) -> Any:
    """bf16 autocast on a GPU when the plan says bf16 (fp32 master weights); fp32 on the CPU."""
    if compute_precision(cfg) == "bf16" and device is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def job_device(cfg: JobConfig) -> torch.device:
    """This rank's device: the CPU, or GPU ``LOCAL_RANK`` of its node (one rank per GPU)."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("the job's device is 'cuda' but torch sees no CUDA device here")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RuntimeError(
            f"local rank {local} but this node has {torch.cuda.device_count()} GPU(s): run at "
            "most one rank per GPU (elastic.nproc_per_node)"
        )
    return torch.device("cuda", local)


class _DeviceTimer:
    """Seconds the device worked inside the block: CUDA events on a GPU (read after a
    synchronize of the end event only), the thread's CPU time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> _DeviceTimer:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._cpu0 = time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.thread_time() - self._cpu0


def learning_rate(cfg: JobConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


@dataclass(slots=True, kw_only=True)
class Trainer:
    """Everything one rank holds while it trains."""

    cfg: JobConfig
    device: torch.device
    session: ElasticSession
    groups: ParallelGroups
    replica: int
    replica_lead: bool  # the replica's first rank: writes its ledger
    model: nn.Module  # what this rank holds: the DiT, or its pipeline chunks
    pipeline: DiTPipeline | None  # with pp > 1
    reducer: GradReducer | None  # with overlap_grad_reduce
    optimizer: torch.optim.Optimizer
    state: dict[str, torch.Tensor]
    stream: StepStream
    consumer: Any
    registry: Any
    ledger: IO[str]


def setup(cfg: JobConfig) -> Trainer:
    """Groups from the job's grid, the model, the session (resuming from its checkpoint), and
    the stream of samples from the encoder servers, positioned after that checkpoint."""
    from step_infra.rpc.consumer import Consumer, ConsumerConfig
    from step_infra.rpc.registry import RegistryClient

    rank = dist.get_rank()
    device = job_device(cfg)
    grid = cfg.strategy.grid(dist.get_world_size())
    # grad_accum here is only informational: replicas take as many samples as they hold.
    session = ElasticSession.begin(global_batch=cfg.global_batch, micro_batch=1)
    s = cfg.strategy
    groups = ParallelGroups.create(grid, sequence_parallel=s.sequence_parallel, cp_kind=s.cp_kind)
    coords = grid.coords(rank)
    replica = coords["dp"]
    # Every rank of a replica (its tp x cp x pp ranks) receives the replica's samples: the
    # first pipeline stage reads the latents and text, the last one the targets.
    member = rank - grid.rank_of(dp=replica)
    pipe = None
    if s.pp > 1:
        pipe = build_pipeline(
            job_dit_config(cfg), groups, n_microbatches=s.pp, seed=cfg.seed, vpp=s.vpp,
            schedule=pipeline_schedule(cfg), device=device,
            loss_fn=partial(weighted_summed_mse, global_batch=cfg.global_batch),
        )  # fmt: skip
        model: nn.Module = pipe.held
    else:
        model = build_model(cfg, groups).to(device)
    apply_recompute(model, s.recompute)
    dp_cp = make_dp_cp_group(grid)  # collective on every rank, used or not
    if s.distributed_optimizer:
        optimizer = make_sharded_adamw(model.parameters(), dp_cp, lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), foreach=False
        )
    reducer = GradReducer(model, groups, dp_cp) if s.overlap_grad_reduce else None
    state = state_dict(model, optimizer, -1, tp_rank=groups.tp_rank, tp_size=groups.tp_size)
    session.load(state)
    registry = RegistryClient(os.environ[REGISTRY_ENV], os.environ.get(TOKEN_ENV, ""))
    addresses = wait_for_producers(registry, LATENT_PIPE, cfg.servers.vae_servers)
    consumer = Consumer(
        LATENT_PIPE,
        addresses,
        group=f"gen{session.generation}.dp{replica}",
        member=f"r{member}",
        config=ConsumerConfig(
            prefetch=cfg.prefetch, ack="manual", group_size=grid.world_size // grid.dp
        ),
        registry=registry,
    )
    stream = StepStream(
        consumer,
        global_batch=cfg.global_batch,
        replica=replica,
        replica_of_rank=[grid.coords(r)["dp"] for r in range(grid.world_size)],
        position=session.start_step * cfg.global_batch,
        group=session.control_group,  # the holders' masks are CPU tensors: gloo
    )
    # A durable checkpoint of a step covers its samples: acknowledge them to the producers.
    session.on_durable = lambda step: {"acknowledged": stream.commit((step + 1) * cfg.global_batch)}
    ledger_dir = session.env.run_dir / "ledger"
    ledger_dir.mkdir(exist_ok=True)
    ledger = (ledger_dir / f"g{session.generation}-r{rank}.jsonl").open("a")
    return Trainer(cfg=cfg, device=device, session=session, groups=groups, replica=replica,
                   replica_lead=member == 0, model=model, pipeline=pipe, reducer=reducer,
                   optimizer=optimizer, state=state, stream=stream, consumer=consumer,
                   registry=registry, ledger=ledger)  # fmt: skip


def train_step(tr: Trainer, rec: Recorder, step: int) -> None:
    """One optimizer step over the step's global batch (this replica's share of it)."""
    cfg, session, groups = tr.cfg, tr.session, tr.groups
    rec.begin_step(step)
    samples, timing = tr.stream.batch(step)
    if tr.replica_lead:  # the replica's record of what it trained (audited later)
        tr.ledger.write(json.dumps({"step": step, "generation": session.generation,
            "node": session.env.node, "replica": tr.replica,
            "ids": [s.id for s in samples]}) + "\n")  # fmt: skip
        tr.ledger.flush()
    rec.record_section("data_wait_s", timing.stall_s)
    rec.record_section("batch_sync", timing.sync_s)
    # "compute" is the time the device worked on this rank's share: CUDA events on a GPU;
    # on the CPU this rank's CPU time, not time spent waiting for a core that the other
    # processes of this shared host hold (wall-clock compute here varies +-40 %).
    with _DeviceTimer(tr.device) as timer:
        tr.optimizer.zero_grad(set_to_none=False)
        if tr.pipeline is not None:
            local = _pipeline_forward_backward(
                tr.pipeline, cfg, groups, samples, tr.device, tr.reducer
            )
        else:
            local = _forward_backward(tr.model, cfg, samples, tr.device, tr.reducer)
    busy = timer.seconds
    slow = session.env.slowdown(step)
    if slow > 1.0:  # fault injection: this node's device is `slow` times slower
        time.sleep(busy * (slow - 1.0))
    if samples:  # normalized to an equal share (replicas get uneven sample counts)
        nominal = cfg.global_batch / groups.dp_size
        rec.record_section("compute", busy * slow * nominal / len(samples))
    session.at_collective(step)
    loss_sum = torch.tensor([local], device=tr.device)
    for g in tr.optimizer.param_groups:
        g["lr"] = learning_rate(cfg, step)
    with rec.collective("grad_allreduce"):
        if tr.reducer is not None:
            tr.reducer.finish(ride_along=[loss_sum])
            clip_grad_norm(tr.model, groups, cfg.grad_clip)
            tr.optimizer.step()
        else:
            apply_update(tr.model, tr.optimizer, groups=groups, grad_clip=cfg.grad_clip,
                         dp_mean=False, ride_along=[loss_sum])  # fmt: skip
    session.step_done(
        rec, step, loss=float(loss_sum) / cfg.global_batch, tokens=float(len(samples))
    )
    session.poll_checkpoint()
    if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
        session.checkpoint(step, tr.state)


def teardown(tr: Trainer) -> None:
    """The final checkpoint, the unsharded weights for sampling, then leave the pipe."""
    last = tr.cfg.steps - 1
    tr.session.final_checkpoint(last, tr.state)
    full = {
        k: v.cpu() for k, v in gather_full_state(tr.model, tr.groups.tp, tr.groups.tp_size).items()
    }
    if tr.groups.pp_size > 1:  # each stage holds its own blocks: rank 0 needs them all
        stages: list[Any] = [None] * tr.groups.pp_size
        dist.all_gather_object(stages, full, group=tr.groups.pp)
        full = {k: v for part in stages for k, v in part.items()}
    if dist.get_rank() == 0:
        run_dir = tr.session.env.run_dir
        tmp = run_dir / f".{FULL_MODEL}.tmp"
        torch.save(full, tmp)
        tmp.replace(run_dir / FULL_MODEL)
    tr.session.done(last)
    tr.ledger.close()
    tr.consumer.close()
    tr.registry.close()
    dist.barrier()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    torch.set_num_threads(1)
    cfg = JobConfig.load(Path(os.environ[RUN_DIR_ENV]))
    if cfg.device == "cuda":
        torch.cuda.set_device(job_device(cfg))
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    tr = setup(cfg)
    with tr.session.recorder() as rec:
        for step in range(tr.session.start_step, cfg.steps):
            train_step(tr, rec, step)
    teardown(tr)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

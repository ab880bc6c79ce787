"""One DiT trainer rank of a streaming job, started by ``torchrun`` under the elastic controller.

Reads latents and text embeddings only from the ``latents`` pipe (spray across data-parallel
replicas; both tensor-parallel ranks of a replica receive the same items), trains with flow
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
from dataclasses import dataclass
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
from step_infra.models.config import conditioned_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups
from step_infra.telemetry.recorder import Recorder
from step_infra.train.flow import FlowConfig, flow_matching_loss, sample_time
from step_infra.train.job.config import JobConfig
from step_infra.train.loop import apply_update, pad_features

log = logging.getLogger(__name__)

REGISTRY_ENV = "STEP_REGISTRY"
FULL_MODEL = "final_model.pt"


def build_model(cfg: JobConfig, groups: ParallelGroups | None = None) -> nn.Module:
    """The job's DiT: the preset with the VAE's latent channels and the encoders' widths."""
    config = conditioned_preset(
        cfg.dit_preset,
        latent_channels=cfg.vae.latent_channels,
        text_dims=(cfg.text_dim_short, cfg.text_dim_long),
    )
    return build_dit(config, groups=groups, seed=cfg.seed)


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
    model: nn.Module, cfg: JobConfig, samples: list[Sample], device: torch.device | None = None
) -> float:
    """Sum of per-sample losses over ``samples``; gradients of ``sum / global_batch``."""
    total = 0.0
    mb = cfg.strategy.micro_batch
    for i in range(0, len(samples), mb):
        b = _inputs(cfg, samples[i : i + mb], device)
        text = (b["text_short"], b["short_lengths"], b["text_long"], b["long_lengths"])

        def velocity(
            x: torch.Tensor, t: torch.Tensor, text: tuple[torch.Tensor, ...] = text
        ) -> torch.Tensor:
            out: torch.Tensor = model(x, t, *text)
            return out

        per_sample = flow_matching_loss(
            velocity,
            b["x0"],
            config=FlowConfig(),
            t=b["t"],
            eps=b["eps"],
            reduce=False,
        )
        (per_sample.sum() / cfg.global_batch).backward()
        total += float(per_sample.detach().sum())
    return total


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
    model: nn.Module
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
    groups = ParallelGroups.create(grid)
    replica = grid.coords(rank)["dp"]
    model = build_model(cfg, groups).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), foreach=False)
    state = state_dict(model, optimizer, -1, tp_rank=groups.tp_rank, tp_size=groups.tp_size)
    session.load(state)
    registry = RegistryClient(os.environ[REGISTRY_ENV], os.environ.get(TOKEN_ENV, ""))
    addresses = wait_for_producers(registry, LATENT_PIPE, cfg.servers.vae_servers)
    consumer = Consumer(
        LATENT_PIPE,
        addresses,
        group=f"gen{session.generation}.dp{replica}",
        member=f"tp{groups.tp_rank}",
        config=ConsumerConfig(prefetch=cfg.prefetch, ack="manual", group_size=grid.tp),
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
    return Trainer(cfg=cfg, device=device, session=session, groups=groups, replica=replica, model=model,
                   optimizer=optimizer, state=state, stream=stream, consumer=consumer,
                   registry=registry, ledger=ledger)  # fmt: skip


def train_step(tr: Trainer, rec: Recorder, step: int) -> None:
    """One optimizer step over the step's global batch (this replica's share of it)."""
    cfg, session, groups = tr.cfg, tr.session, tr.groups
    rec.begin_step(step)
    samples, timing = tr.stream.batch(step)
    if groups.tp_rank == 0:  # the replica's record of what it trained (audited later)
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
        local = _forward_backward(tr.model, cfg, samples, tr.device)
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

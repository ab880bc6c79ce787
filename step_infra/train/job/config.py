"""What one streaming training job is: model, data, batch, layout, encoder split, faults.

A :class:`JobConfig` is one tree of small configs: the data and VAE, the layout and batch
(the emulator's :class:`Strategy`, the same type a plan carries), the encoder servers
(:class:`EncoderServers`) and the elastic controller (:class:`ElasticConfig`). The launcher
writes it to ``<run_dir>/config.toml`` and every process it starts reads its part back from
there (encoder servers their tables, trainer ranks the whole tree), so all of them agree on
shapes, seeds and sample ids without a long command line. Recipes are named functions
returning one; a plan from ``step-infra plan`` is applied with :func:`apply_plan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step_infra import config_io
from step_infra.data.servers import EncoderServers
from step_infra.data.synthetic import SyntheticConfig
from step_infra.elastic.controller import ElasticConfig
from step_infra.emulator.plan import Plan
from step_infra.emulator.strategy import Strategy
from step_infra.models.config import get_preset
from step_infra.models.vae import VAEConfig
from step_infra.telemetry.detector import DetectorConfig
from step_infra.topology import ProcessGrid

CONFIG_FILE = "config.toml"

# Two nodes x two ranks on a shared 2-core host. Ranks are compared with each other (four:
# a weak majority, so they must be >= 15 % slower), and the two nodes by the log ratio of
# their medians against zero, scaled by its own spread over older windows and by the spread
# the ranks show inside their nodes. Windows of 3 steps (their median), 4 of the last 6 slow:
# a node slowed 30 % is convicted 10-13 steps later (3 of 4 took 7-10, but under the
# benchmark's --harsh noise blamed a healthy rank in 1 of 30 runs; 4 of 6 in none).
# With more ranks (8 x 2) a rank or node must be >= 10 % slower.
# The spread is capped at 0.05 so that a node 22 % slower is enough on a very noisy host. An
# eviction must still pay for itself (elastic/policy.py): the saving over the steps left
# against the restart this launch measured.
JOB_DETECTOR = DetectorConfig(
    warmup_steps=5,
    min_effect=0.10,  # windows of 3 steps are noisier: 5 % once convicted a node of 8 x 2
    window_steps=3,
    persist_k=4,
    persist_n=6,
    pair_max_sigma=0.05,
    mad_floor=0.02,
)

# What the streaming trainer cannot run of a strategy, each value the one it runs; a plan
# asking for another is refused by name. Everything else of a plan it runs: pipeline stages
# (interleaved with vpp > 1), Ulysses or ring context parallel, megatron-style sequence
# parallel, selective or full recompute, ZeRO-1 (``distributed_optimizer``), gradients
# reduced in buckets during the backward (``overlap_grad_reduce``). ``bf16`` computes in bf16
# on GPUs and, said at launch, in fp32 on the CPU (whose bf16 matmuls are emulated).
TRAINER_RUNS: dict[str, Any] = {
    "overlap_tp_comm": False,  # Transformer Engine's userbuffer overlap (CUDA only)
    # ZeRO's updated parameters are broadcast right after the step, not during the next
    # forward: set overlap_param_gather = false in the plan.
    "overlap_param_gather": False,
    "precision": "bf16",  # fp8 needs Transformer Engine layers in the DiT
}


def job_strategy(**settings: Any) -> Strategy:
    """A strategy for a recipe: tensor x data parallel with a replicated optimizer and
    gradients reduced after the backward unless ``settings`` say otherwise."""
    base: dict[str, Any] = {
        "distributed_optimizer": False,
        "overlap_grad_reduce": False,
        "overlap_param_gather": False,
    }
    return Strategy(**{**base, **settings})


def job_elastic(**settings: Any) -> ElasticConfig:
    """The controller settings of a streaming job: 2 nodes x 2 ranks + a spare, the job's
    detector; ``run_dir``, ``worker_args`` and the environment are filled at launch."""
    defaults: dict[str, Any] = {
        "run_dir": Path("."),
        "nodes": 2,
        "nproc_per_node": 2,
        "spares": 1,
        "detector": JOB_DETECTOR,
    }
    return ElasticConfig(**{**defaults, **settings})


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Faults injected on purpose (demos and tests).

    ``slow``: ``"node:from_step:factor"``, that node's compute stretched by ``factor``.
    ``kill``: ``"node:at_step"``, the launcher sends SIGKILL to that node's first trainer
    process once it reports ``at_step`` (an external ``kill -9``, not a Python exception).
    """

    slow: str | None = None
    kill: str | None = None

    def kill_target(self) -> tuple[str, int] | None:
        if not self.kill:
            return None
        try:
            node, step = self.kill.split(":")
            return node, int(step)
        except ValueError as exc:
            raise ValueError(f"kill fault {self.kill!r}: expected 'node:at_step'") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class JobConfig:
    """One job. The grid is ``strategy.grid(world_size)``: ``elastic.nodes x
    elastic.nproc_per_node`` ranks, ``tp`` per replica, the rest data-parallel replicas.

    Encoder servers stand for encoder GPUs: each is paced to its ``servers.*_rate`` samples/s
    (its real encode work runs inside that budget), so the encoder/trainer split behaves as
    on a cluster whatever else shares this machine's cores.
    """

    name: str
    dit_preset: str = "tiny-dit"
    data: SyntheticConfig = field(
        default_factory=lambda: SyntheticConfig(num_clips=2048, frames=9, height=16, width=16)
    )
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_steps: int = 150  # VAE pre-training (cached per run directory)
    strategy: Strategy = field(
        default_factory=lambda: job_strategy(tp=2, global_batch=16, micro_batch=4)
    )
    servers: EncoderServers = field(
        default_factory=lambda: EncoderServers(text_servers=1, vae_servers=2, vae_rate=32.0)
    )
    elastic: ElasticConfig = field(default_factory=job_elastic)
    steps: int = 60
    lr: float = 2e-3
    warmup_steps: int = 5
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    checkpoint_every: int = 5
    prefetch: int = 8  # items per producer link a trainer may hold before taking
    faults: Faults = field(default_factory=Faults)
    text_dim_short: int = 384  # the launcher writes what the text encoders produce
    text_dim_long: int = 128
    sample_prompts: int = 4
    sample_steps: int = 20
    seed: int = 0
    # "cpu": gloo, every rank on the host's cores. "cuda": NCCL, rank i on GPU i of its node
    # (local rank), so a node may run at most as many ranks as it has GPUs.
    device: str = "cpu"
    # torch.distributed.pipelining schedule with pp > 1: "auto" (1F1B, interleaved with
    # vpp > 1), or one of step_infra.models.pipeline.SCHEDULES (e.g. "zero_bubble").
    pp_schedule: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; expected 'cpu' or 'cuda'")
        s, e = self.strategy.check(), self.elastic
        s.refuse(TRAINER_RUNS, by="the streaming trainer")
        from step_infra.models.pipeline import SCHEDULES

        if self.pp_schedule not in ("auto", *SCHEDULES):
            raise ValueError(
                f"pp_schedule={self.pp_schedule!r}; expected 'auto' or one of {sorted(SCHEDULES)}"
            )
        if e.nproc_per_node % s.tp:
            raise ValueError(
                f"tp={s.tp} must divide nproc_per_node={e.nproc_per_node} (a replica's "
                "tensor-parallel ranks stay on one node): pass --nproc-per-node"
            )
        layers = get_preset(self.dit_preset).num_layers
        if s.pp * s.vpp > layers:
            raise ValueError(
                f"pp={s.pp} x vpp={s.vpp} virtual stages exceed the {layers} blocks of "
                f"{self.dit_preset!r}"
            )
        if s.vpp > 1 and s.pp == 1:
            raise ValueError(f"vpp={s.vpp} needs pp > 1 (it interleaves pipeline stages)")
        self.grid  # noqa: B018  (validates dp against the world size)
        if s.global_batch % s.micro_batch:
            raise ValueError(
                f"global_batch={s.global_batch} must be a multiple of micro_batch={s.micro_batch}"
            )
        if min(self.steps, self.checkpoint_every) < 1:
            raise ValueError(
                f"steps and checkpoint_every must be >= 1; got {self.steps}, {self.checkpoint_every}"
            )
        self.faults.kill_target()  # validates

    @property
    def world_size(self) -> int:
        return self.elastic.nodes * self.elastic.nproc_per_node

    @property
    def grid(self) -> ProcessGrid:
        return self.strategy.grid(self.world_size)

    @property
    def global_batch(self) -> int:
        return self.strategy.global_batch

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    def save(self, run_dir: Path) -> Path:
        """Write ``<run_dir>/config.toml`` (what every process of the job reads)."""
        return config_io.save(
            self, Path(run_dir) / CONFIG_FILE, header=f"step-infra job {self.name}"
        )

    @classmethod
    def load(cls, run_dir: Path) -> JobConfig:
        return config_io.load(Path(run_dir) / CONFIG_FILE, cls)


def compute_precision(cfg: JobConfig) -> str:
    """What the trainer computes in: the plan's ``bf16`` on a GPU (autocast, fp32 master
    weights and optimizer), fp32 on the CPU, whose bf16 matmuls are emulated and slow."""
    return "bf16" if cfg.device == "cuda" else "fp32"


def trainer_layout(cfg: JobConfig) -> str:
    """One line naming every setting of the layout the trainer runs (printed at launch)."""
    s, g = cfg.strategy, cfg.grid
    parts = [f"tp={g.tp} pp={g.pp} cp={g.cp} dp={g.dp}"]
    if s.pp > 1:
        parts.append(f"vpp={s.vpp} {pipeline_schedule(cfg)}")
    if s.cp > 1:
        parts.append(f"{s.cp_kind} cp")
    if s.sequence_parallel:
        parts.append("sequence parallel")
    parts.append(f"recompute {s.recompute}")
    parts.append("ZeRO-1" if s.distributed_optimizer else "replicated AdamW")
    if s.overlap_grad_reduce:
        parts.append("grads reduced in buckets during the backward")
    precision = compute_precision(cfg)
    parts.append(precision if precision == s.precision else f"{precision} (plan: {s.precision})")
    return ", ".join(parts)


def pipeline_schedule(cfg: JobConfig) -> str:
    """The torch.distributed.pipelining schedule: the job's, or 1F1B (interleaved when
    ``vpp > 1``)."""
    if cfg.pp_schedule != "auto":
        return cfg.pp_schedule
    return "interleaved_1f1b" if cfg.strategy.vpp > 1 else "1f1b"


def apply_plan(cfg: JobConfig, plan: Plan) -> JobConfig:
    """The job with the plan's layout and batch and, when it has one, its encoder split.
    A plan for another model, or with settings the trainer cannot run, is refused."""
    if plan.preset != cfg.dit_preset:
        raise ValueError(
            f"the plan is for {plan.preset!r} but recipe {cfg.name!r} trains "
            f"{cfg.dit_preset!r}; plan with `step-infra plan --model {cfg.dit_preset}`"
        )
    out = cfg.replace(strategy=plan.strategy)  # validates: refused keys, dp vs world size
    if plan.allocation is not None:
        out = out.replace(
            servers=dataclasses.replace(
                out.servers,
                vae_servers=plan.allocation.vae_gpus,
                text_servers=plan.allocation.text_gpus,
            )
        )
    return out


def encoder_split(
    trainer_samples_per_s: float, *, vae_rate: float, text_rate: float, margin: float = 1.15
) -> tuple[int, int]:
    """Servers of each kind that feed ``trainer_samples_per_s`` with ``margin`` headroom."""
    need = trainer_samples_per_s * margin
    return max(1, math.ceil(need / vae_rate)), max(1, math.ceil(need / text_rate))


def tiny_t2v() -> JobConfig:
    """The demo's job: tiny-dit, tp=2 x dp=2 on 2 nodes x 2 ranks + 1 hot spare, a node
    throttled to a quarter of its speed at step 18 (after the straggler detector's warm-up)
    and a trainer killed (-9) at step 100.

    Long enough for evicting the throttled node to pay: its compute (about 0.09 s of a 0.3 s
    step here) costs the job some 0.28 s a step, over the ~125 steps left about 35 s, against
    a restart priced at this launch's start-up (15-23 s on 2 shared cores). A 30 % slowdown
    would save under 3 s and, rightly, be reported and kept (``eviction_deferred``)."""
    return JobConfig(
        name="tiny-t2v", steps=150, faults=Faults(slow="node1:18:4.0", kill="node0:100")
    )


def micro_t2v() -> JobConfig:
    """The integration test's job: micro-dit, same layout, a trainer killed (-9) at step 14
    (straggler eviction is the demo's and the telemetry tests' business)."""
    return JobConfig(
        name="micro-t2v",
        dit_preset="micro-dit",
        data=SyntheticConfig(num_clips=256, frames=5, height=8, width=8),
        vae_steps=20,
        steps=24,
        strategy=job_strategy(tp=2, global_batch=8, micro_batch=4),
        servers=EncoderServers(text_servers=1, vae_servers=2, vae_rate=40.0),
        checkpoint_every=4,
        faults=Faults(kill="node0:14"),
        sample_prompts=2,
        sample_steps=4,
    )


def gpu_t2v(gpus: int = 1) -> JobConfig:
    """The GPU suite's job: micro-dit on NCCL, one node with one rank per GPU (tensor x data
    parallel: tp 2 when there are two GPUs or more), a trainer killed (-9) at step 14 to show
    the checkpoint and the resume. No hot spare (a second GPU node is rarely at hand)."""
    tp = 2 if gpus >= 2 and gpus % 2 == 0 else 1
    return micro_t2v().replace(
        name="gpu-t2v",
        device="cuda",
        strategy=job_strategy(tp=tp, global_batch=8 * gpus, micro_batch=4),
        elastic=job_elastic(nodes=1, nproc_per_node=gpus, spares=0),
    )


RECIPES: dict[str, Callable[[], JobConfig]] = {
    "tiny-t2v": tiny_t2v,
    "micro-t2v": micro_t2v,
    "gpu-t2v": gpu_t2v,
}


def get_recipe(name: str) -> JobConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()

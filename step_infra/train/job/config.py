"""What one streaming training job is: model, data, batch, layout, encoder split, faults.

A :class:`JobConfig` is written to ``<run_dir>/job.json`` by the launcher and read back by
every process it starts (encoder servers, trainer ranks), so all of them agree on shapes,
seeds and sample ids without a long command line. Recipes are named functions returning one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step_infra.data.synthetic import SyntheticConfig
from step_infra.models.vae import VAEConfig
from step_infra.telemetry.detector import DetectorConfig

# Two nodes x two ranks on a shared 2-core host. Ranks are compared with each other (four:
# a weak majority, so they must be >= 15 % slower), and the two nodes by the log ratio of
# their medians against zero, scaled by its own spread over older windows and by the spread
# the ranks show inside their nodes. Windows of 3 steps (their median), 4 of the last 6 slow:
# a node slowed 30 % is convicted 10-13 steps later (3 of 4 took 7-10, but under the
# benchmark's --harsh noise blamed a healthy rank in 1 of 30 runs; 4 of 6 in none).
# With more ranks (8 x 2) a rank or node must be >= 10 % slower.
# The spread is capped at 0.05 so that a node 22 % slower is enough on a very noisy host. An
# eviction must still pay for itself (telemetry/policy.py): the saving over the steps left
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
    """One job. ``dp`` is derived: ``nodes * nproc_per_node / tp`` data-parallel replicas.

    Encoder servers stand for encoder GPUs: each is paced to ``*_rate`` samples/s (its real
    encode work runs inside that budget), so the encoder/trainer split behaves as on a cluster
    whatever else shares this machine's cores.
    """

    name: str
    dit_preset: str = "tiny-dit"
    data: SyntheticConfig = field(
        default_factory=lambda: SyntheticConfig(num_clips=2048, frames=9, height=16, width=16)
    )
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_steps: int = 150  # VAE pre-training (cached per run directory)
    steps: int = 60
    global_batch: int = 16
    micro_batch: int = 4
    lr: float = 2e-3
    warmup_steps: int = 5
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    checkpoint_every: int = 5
    tp: int = 2
    nodes: int = 2
    nproc_per_node: int = 2
    spares: int = 1
    text_servers: int = 1
    vae_servers: int = 2
    text_rate: float = 200.0  # samples/s per text-encoder server
    vae_rate: float = 32.0  # samples/s per VAE server
    prefetch: int = 8  # items per producer link a trainer may hold before taking
    lease_s: float = 5.0  # a trainer silent this long loses its unacknowledged items
    faults: Faults = field(default_factory=Faults)
    # "evict": evict a straggler when it pays (telemetry/policy.py); "detect": a dry run that
    # only logs "would have evicted at step N, saving X s" (events.jsonl, dashboard).
    eviction: str = "evict"
    metrics_port: int | None = None  # the controller's Prometheus endpoint (straggler scores)
    text_dim_short: int = 384  # the launcher writes what the text encoders produce
    text_dim_long: int = 128
    sample_prompts: int = 4
    sample_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        world = self.nodes * self.nproc_per_node
        if self.tp < 1 or world % self.tp or self.nproc_per_node % self.tp:
            raise ValueError(
                f"tp={self.tp} must divide nproc_per_node={self.nproc_per_node} (a replica's "
                "tensor-parallel ranks stay on one node)"
            )
        if self.eviction not in ("evict", "detect"):
            raise ValueError(f"eviction must be 'evict' or 'detect', got {self.eviction!r}")
        per_step = self.micro_batch
        if self.global_batch < per_step or self.global_batch % per_step:
            raise ValueError(
                f"global_batch={self.global_batch} must be a multiple of micro_batch={self.micro_batch}"
            )
        if min(self.steps, self.checkpoint_every, self.text_servers, self.vae_servers) < 1:
            raise ValueError(
                "steps, checkpoint_every, text_servers and vae_servers must all be >= 1; got "
                f"{self.steps}, {self.checkpoint_every}, {self.text_servers}, {self.vae_servers}"
            )
        if min(self.text_rate, self.vae_rate) <= 0:
            raise ValueError(f"encoder rates must be > 0, got {self.text_rate}, {self.vae_rate}")
        self.faults.kill_target()  # validates

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        doc = json.loads(text)
        doc["data"] = SyntheticConfig(
            **{**doc["data"], "radius_range": tuple(doc["data"]["radius_range"]),
               "directions": tuple(doc["data"]["directions"])}
        )  # fmt: skip
        doc["vae"] = VAEConfig(
            **{**doc["vae"], "factors": tuple(map(tuple, doc["vae"]["factors"]))}
        )
        doc["faults"] = Faults(**doc["faults"])
        return cls(**doc)

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / "job.json"
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, run_dir: Path) -> JobConfig:
        return cls.from_json((Path(run_dir) / "job.json").read_text())


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
        global_batch=8,
        micro_batch=4,
        checkpoint_every=4,
        vae_rate=40.0,
        faults=Faults(kill="node0:14"),
        sample_prompts=2,
        sample_steps=4,
    )


RECIPES: dict[str, Callable[[], JobConfig]] = {"tiny-t2v": tiny_t2v, "micro-t2v": micro_t2v}


def get_recipe(name: str) -> JobConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()

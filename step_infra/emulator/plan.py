"""The plan: what ``step-infra plan`` decides and the launcher and every trainer rank run.

One type, :class:`Plan`, holds the model preset, the layout (:class:`Strategy`, Megatron
vocabulary, mapped to the process grid by :meth:`Strategy.grid`), the encoder/trainer GPU
split and what the emulator predicts (so a run can be compared with its plan). It is saved
as TOML with one generic writer (:mod:`step_infra.config_io`) and read back with one loader,
:meth:`Plan.load`, which refuses keys it does not know. A consumer that cannot honour part of
a plan says so with :meth:`Plan.refuse`, never by dropping it silently.

    [model]       preset = "stepvideo-t2v-30b"
    [strategy]    tp, pp, vpp, cp, cp_kind, dp, micro_batch, global_batch, ...
    [allocation]  vae_gpus, text_gpus, trainer_gpus      (optional)
    [prediction]  step_time_s, tflops_per_gpu, memory_gb_per_gpu   (optional)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step_infra import config_io
from step_infra.emulator.allocation import Allocation
from step_infra.emulator.estimate import Estimate
from step_infra.emulator.strategy import Strategy
from step_infra.topology import ProcessGrid


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRef:
    """Which model the plan is for: a preset name of ``step_infra.models``."""

    preset: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EncoderSplit:
    """GPUs given to the VAE and text-encoder servers, and to the DiT trainers."""

    vae_gpus: int
    text_gpus: int
    trainer_gpus: int

    def __post_init__(self) -> None:
        for name in ("vae_gpus", "text_gpus", "trainer_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"allocation.{name}={getattr(self, name)}; expected >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """What the emulator expects of the chosen layout (per GPU, per training step)."""

    step_time_s: float | None = None
    tflops_per_gpu: float | None = None
    memory_gb_per_gpu: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A layout to run: model, strategy, encoder split, prediction."""

    model: ModelRef
    strategy: Strategy = field(default_factory=Strategy)
    allocation: EncoderSplit | None = None
    prediction: Prediction | None = None

    @classmethod
    def from_estimate(
        cls, model_name: str, estimate: Estimate, allocation: Allocation | None = None
    ) -> Plan:
        split = None
        if allocation is not None:
            split = EncoderSplit(
                vae_gpus=allocation.vae_gpus,
                text_gpus=allocation.text_gpus,
                trainer_gpus=allocation.trainer_gpus,
            )
        return cls(
            model=ModelRef(preset=model_name),
            strategy=estimate.strategy,
            allocation=split,
            prediction=Prediction(
                step_time_s=round(estimate.step_time_s, 6),
                tflops_per_gpu=round(estimate.tflops_per_gpu, 6),
                memory_gb_per_gpu=round(estimate.memory_gb_per_gpu, 6),
            ),
        )

    @property
    def preset(self) -> str:
        return self.model.preset

    def grid(self, world_size: int | None = None) -> ProcessGrid:
        """The process grid of this plan (``world_size`` fills ``dp`` when the plan has none)."""
        return self.strategy.grid(world_size)

    def refuse(self, supported: Mapping[str, Any], *, by: str) -> None:
        """Raise ``ValueError`` for every strategy setting ``by`` cannot honour
        (:meth:`Strategy.refuse`)."""
        self.strategy.refuse(supported, by=f"{by}: this plan's")

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)

    def dumps(self) -> str:
        return config_io.dumps(self, header="written by step-infra plan")

    def save(self, path: str | Path) -> Path:
        return config_io.save(self, path, header="written by step-infra plan")

    @classmethod
    def loads(cls, text: str, *, source: str = "plan") -> Plan:
        plan = config_io.loads(text, cls, source=source)
        plan.strategy.check()
        return plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file; unknown tables or keys, and impossible layouts, are errors."""
        p = Path(path)
        if not p.exists():
            raise ValueError(f"plan file {p} does not exist (write one with `step-infra plan`)")
        return cls.loads(p.read_text(), source=str(p))


def save_plan(
    path: str | Path, model_name: str, estimate: Estimate, allocation: Allocation | None = None
) -> Path:
    """Write the plan of ``estimate`` (and the encoder split) to ``path``."""
    return Plan.from_estimate(model_name, estimate, allocation).save(path)


def load_plan(path: str | Path) -> Plan:
    """Read the plan at ``path`` (:meth:`Plan.load`)."""
    return Plan.load(path)

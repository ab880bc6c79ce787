"""Recipes as plain functions returning configs: T2I -> T2VI low -> T2VI high -> T2V -> DPO -> average.

Each stage starts from the previous stage's weights (the runner carries them over). The
``tiny_*`` functions size everything for two CPU cores and the synthetic moving-shape data;
the stage structure is the one in the Step-Video report (shared/REFERENCE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from step_infra.data.synthetic import SyntheticConfig
from step_infra.models.vae import VAEConfig
from step_infra.train.flow import FlowConfig
from step_infra.train.loop import OptimConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class StageConfig:
    """One training stage."""

    name: str
    kind: str = "flow"  # "flow" | "dpo" | "average"
    size: int = 16  # clip height = width, pixels
    frames: int = 9  # 1 for image-only stages
    image_fraction: float = 0.0  # share of steps that train on single frames (T2VI)
    batch: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=100))
    flow: FlowConfig = field(default_factory=FlowConfig)
    caption_dropout: float = 0.1
    dpo_beta: float = 200.0
    dpo_prompts: int = 96  # prompts the preference tool samples pairs for
    dpo_candidates: int = 4  # samples per prompt; best and worst form the pair
    dpo_sample_steps: int = 20  # Euler steps for the candidates
    average_last: int = 4  # "average": how many of the previous stage's checkpoints

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "dpo", "average"):
            raise ValueError(f"stage kind must be flow, dpo or average, got {self.kind!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingConfig:
    steps: int = 30
    guidance: float = 4.0
    shift: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TurboConfig:
    """Self-distillation of the final model into a few-step student."""

    pairs: int = 256
    teacher_steps: int = 50
    student_steps: int = 8
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(steps=200, lr=3e-4, warmup_steps=5)
    )
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeConfig:
    """A whole staged run: data, VAE, DiT preset, stages, evaluation."""

    name: str
    data: SyntheticConfig
    vae: VAEConfig
    vae_optim: OptimConfig
    dit_preset: str
    stages: tuple[StageConfig, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    turbo: TurboConfig | None = None
    eval_prompts: int = 96
    seed: int = 0


def t2i_pretrain(*, steps: int = 300, lr: float = 2e-3) -> StageConfig:
    """Text-to-image: single frames, learn appearance from captions."""
    return StageConfig(name="t2i", size=16, frames=1, optim=OptimConfig(steps=steps, lr=lr))


def t2vi_low(*, steps: int = 300, lr: float = 2e-3) -> StageConfig:
    """Joint video + image at low resolution: learn motion cheaply."""
    return StageConfig(
        name="t2vi-low",
        size=8,
        frames=9,
        image_fraction=0.25,
        optim=OptimConfig(steps=steps, lr=lr),
    )


def t2vi_high(*, steps: int = 400, lr: float = 1.5e-3) -> StageConfig:
    """Joint video + image at the target resolution."""
    return StageConfig(
        name="t2vi-high",
        size=16,
        frames=9,
        image_fraction=0.2,
        optim=OptimConfig(steps=steps, lr=lr),
    )


def t2v_finetune(*, steps: int = 200, lr: float = 5e-4, checkpoint_every: int = 50) -> StageConfig:
    """Video-only fine-tune at lower learning rate; checkpoints kept for averaging."""
    return StageConfig(
        name="t2v",
        size=16,
        frames=9,
        optim=OptimConfig(steps=steps, lr=lr, warmup_steps=5, checkpoint_every=checkpoint_every),
    )


def dpo(
    *, steps: int = 100, lr: float = 5e-5, beta: float = 200.0, checkpoint_every: int = 25
) -> StageConfig:
    """Diffusion-DPO on pairs the preference tool builds from the fine-tuned model."""
    return StageConfig(
        name="dpo",
        kind="dpo",
        batch=16,
        dpo_beta=beta,
        dpo_prompts=96,
        dpo_sample_steps=15,
        caption_dropout=0.0,
        optim=OptimConfig(steps=steps, lr=lr, warmup_steps=5, checkpoint_every=checkpoint_every),
    )


def average(*, last: int = 4) -> StageConfig:
    """Average the last checkpoints of the previous stage (streamed)."""
    return StageConfig(
        name="average", kind="average", average_last=last, optim=OptimConfig(steps=1)
    )


def tiny_staged_recipe(*, scale: float = 1.0, seed: int = 0, turbo: bool = False) -> RecipeConfig:
    """The CPU recipe: tiny VAE, ``tiny-dit``, every stage. ``scale`` multiplies step counts.

    Sized to finish well inside 15 minutes on two (shared) CPU cores; ``turbo=True`` adds the
    few-step distillation after averaging (a few more minutes).
    """

    def s(n: int) -> int:
        return max(10, int(n * scale))

    return RecipeConfig(
        name="tiny-staged",
        data=SyntheticConfig(num_clips=2048, frames=9, height=16, width=16, seed=seed),
        vae=VAEConfig(),
        vae_optim=OptimConfig(steps=s(400), lr=5e-4, warmup_steps=20),
        dit_preset="tiny-dit",
        stages=(
            t2i_pretrain(steps=s(250)),
            t2vi_low(steps=s(300)),
            t2vi_high(steps=s(400)),
            t2v_finetune(steps=s(200), checkpoint_every=max(1, s(200) // 4)),
            dpo(steps=s(100), checkpoint_every=max(1, s(100) // 4)),
            average(last=4),
        ),
        sampling=SamplingConfig(steps=20, guidance=4.0),
        turbo=TurboConfig(pairs=192, optim=OptimConfig(steps=s(150), lr=3e-4, warmup_steps=5))
        if turbo
        else None,
        eval_prompts=48,
        seed=seed,
    )

"""Turbo: self-distillation with rectified flow ("reflow") for few-step sampling.

The teacher integrates its guided ODE from noise ``z`` to a sample ``x0`` in many steps (50).
Each ``(z, x0)`` pair is joined by a straight line, and the student (initialised from the
teacher) is trained to predict that line's constant velocity ``z - x0`` at any point on it.
Straight trajectories are integrated almost exactly by a few Euler steps (8-10), and the
guidance is baked into the pairs, so the student samples without classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from step_infra.train.flow import FlowConfig, interpolate, sample_time


def reflow_loss(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    *,
    flow: FlowConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flow matching on fixed teacher pairs: target ``noise - x0`` along their straight line."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must match")
    t = sample_time(x0.shape[0], flow, generator)
    return (velocity(interpolate(x0, noise, t), t) - (noise - x0)).square().mean()

"""Rectified-flow matching objective and the Euler sampler with classifier-free guidance.

Sign convention (shared/REFERENCE.md leaves it open; this is the one used everywhere here):
``t = 0`` is data and ``t = 1`` is noise,

    x_t = (1 - t) * x_0 + t * eps,        v_target = dx_t/dt = eps - x_0,

and sampling integrates ``dx/dt = v`` from ``t = 1`` down to ``t = 0``
(``x <- x + (t_next - t) * v`` with ``t_next < t``). Training times are drawn logit-normal
(``t = sigmoid(mean + std * n)``) and then shifted as in SD3,
``t' = shift * t / (1 + (shift - 1) * t)``, which moves mass towards noise for ``shift > 1``;
the sampler's grid is shifted the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> v


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowConfig:
    """Time sampling for training."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.shift <= 0 or self.logit_std <= 0:
            raise ValueError(
                f"shift and logit_std must be > 0, got shift={self.shift}, logit_std={self.logit_std}"
            )


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift; identity for ``shift == 1``."""
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    batch: int, config: FlowConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[batch]`` training times: logit-normal, then shifted."""
    n = torch.randn(batch, generator=generator)
    return shift_time(torch.sigmoid(config.logit_mean + config.logit_std * n), config.shift)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x_0 + t eps`` with ``t`` broadcast over all but the batch dimension."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * eps


def flow_matching_loss(
    velocity: VelocityFn,
    x0: torch.Tensor,
    *,
    config: FlowConfig,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """Mean squared error between predicted and target velocity (per sample if not ``reduce``).

    Times and noise are drawn from ``generator`` unless given (the streaming job draws them
    per sample, from a generator seeded by the sample's id, so a sample's loss does not
    depend on which rank or batch it lands in)."""
    if t is None:
        t = sample_time(x0.shape[0], config, generator)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator)
    t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
    err = (velocity(interpolate(x0, eps, t), t) - (eps - x0)).square()
    per_sample = err.flatten(1).mean(1)
    return per_sample.mean() if reduce else per_sample


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 (noise) to 0 (data), shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(
    cond: VelocityFn,
    noise: torch.Tensor,
    *,
    steps: int,
    shift: float = 1.0,
    uncond: VelocityFn | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Integrate from ``noise`` at t=1 to data at t=0 with Euler steps.

    With ``uncond`` and ``guidance != 1`` the velocity is
    ``v_uncond + guidance * (v_cond - v_uncond)`` (classifier-free guidance).
    """
    x = noise
    grid = time_grid(steps, shift).to(noise.device)
    for i in range(steps):
        t = grid[i].expand(x.shape[0])
        v = cond(x, t)
        if uncond is not None and guidance != 1.0:
            vu = uncond(x, t)
            v = vu + guidance * (v - vu)
        x = x + (grid[i + 1] - grid[i]) * v
    return x

"""Diffusion-DPO (Wallace et al., 2023) for flow matching, with a frozen reference model.

For a preference pair (preferred ``w``, rejected ``l``) of the same prompt, the same noise
and time are used for both, and with ``e = per-sample velocity MSE``:

    loss = -log sigmoid(-0.5 * beta * ((e_w - e_l) - (e_ref_w - e_ref_l)))

(shared/REFERENCE.md). It starts at log 2 when policy == reference and falls as the policy
fits preferred samples better than the reference does, relative to rejected ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from step_infra.train.flow import FlowConfig, interpolate, sample_time

Velocity = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def diffusion_dpo_loss(
    policy: Velocity,
    reference: Velocity,
    x_w: torch.Tensor,
    x_l: torch.Tensor,
    text: dict[str, torch.Tensor],
    *,
    beta: float,
    flow: FlowConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO loss over a batch of pairs; also returns the implicit reward accuracy."""
    if x_w.shape != x_l.shape:
        raise ValueError(f"preferred {tuple(x_w.shape)} and rejected {tuple(x_l.shape)} differ")
    b = x_w.shape[0]
    t = sample_time(b, flow, generator)
    eps = torch.randn(x_w.shape, generator=generator)
    x = torch.cat([interpolate(x_w, eps, t), interpolate(x_l, eps, t)])
    target = torch.cat([eps - x_w, eps - x_l])
    tt = torch.cat([t, t])
    text2 = {k: torch.cat([v, v]) for k, v in text.items()}

    def errors(fn: Velocity) -> tuple[torch.Tensor, torch.Tensor]:
        e = (fn(x, tt, text2) - target).square().flatten(1).mean(1)
        return e[:b], e[b:]

    e_w, e_l = errors(policy)
    with torch.no_grad():
        r_w, r_l = errors(reference)
    margin = (e_w - e_l) - (r_w - r_l)
    loss = -F.logsigmoid(-0.5 * beta * margin).mean()
    return loss, {"reward_accuracy": float((margin < 0).float().mean())}

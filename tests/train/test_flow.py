"""Flow matching: convention, time sampling, and an Euler sampler that is exact on straight paths."""

from __future__ import annotations

import pytest
import torch

from step_infra.train.flow import (
    FlowConfig,
    euler_sample,
    flow_matching_loss,
    interpolate,
    sample_time,
    shift_time,
    time_grid,
)


def test_convention_t0_is_data_t1_is_noise() -> None:
    x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(
        interpolate(x0, eps, torch.tensor([0.0, 1.0]))[:, 0], torch.tensor([0.0, 1.0])
    )


def test_shift_moves_times_towards_noise() -> None:
    g = torch.Generator().manual_seed(0)
    t1 = sample_time(4000, FlowConfig(shift=1.0), g)
    g = torch.Generator().manual_seed(0)
    t3 = sample_time(4000, FlowConfig(shift=3.0), g)
    assert t1.min() > 0 and t1.max() < 1
    assert abs(t1.mean().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 1/2
    assert t3.mean() > t1.mean() + 0.1
    torch.testing.assert_close(shift_time(torch.tensor([0.0, 1.0]), 5.0), torch.tensor([0.0, 1.0]))
    grid = time_grid(10, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())


def test_euler_is_exact_for_the_true_velocity_of_one_point() -> None:
    c = torch.tensor([[0.5, -2.0]])

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - c) / t.clamp(min=1e-6)[:, None]  # velocity field when all data equals c

    out = euler_sample(v, torch.randn(1, 2), steps=7, shift=3.0)
    torch.testing.assert_close(out, c)
    # CFG with guidance g extrapolates: uncond pointing at 0 and g=2 lands at 2c.
    zero = torch.zeros_like(c)
    out = euler_sample(
        v, torch.randn(1, 2), steps=5, uncond=lambda x, t: (x - zero) / t[:, None], guidance=2.0
    )
    torch.testing.assert_close(out, 2 * c)


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise() -> None:
    x0 = torch.randn(3, 4)
    g = torch.Generator().manual_seed(1)
    loss = flow_matching_loss(
        lambda x, t: torch.zeros_like(x), x0, config=FlowConfig(), generator=g
    )
    assert loss > 0.5  # E|eps - x0|^2 = 2 per element
    with pytest.raises(ValueError, match="shift"):
        FlowConfig(shift=0)

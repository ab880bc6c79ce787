"""Training objectives and loops: flow matching, Euler/CFG sampling, Diffusion-DPO, Turbo."""

from step_infra.train.flow import (
    FlowConfig,
    euler_sample,
    flow_matching_loss,
    interpolate,
    sample_time,
    shift_time,
    time_grid,
)

__all__ = [
    "FlowConfig",
    "euler_sample",
    "flow_matching_loss",
    "interpolate",
    "sample_time",
    "shift_time",
    "time_grid",
]

"""Training: flow matching, Euler/CFG sampling, Diffusion-DPO, Turbo, the single-process loop
(``loop``, whose :func:`~step_infra.train.loop.apply_update` every trainer calls after its
backward) and the streaming, elastic training job (``job/``, ``step-infra train``).

Names load their module on first use (PEP 562), so ``step_infra.train.cli`` starts without
torch.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    **{
        name: "flow"
        for name in (
            "FlowConfig",
            "euler_sample",
            "flow_matching_loss",
            "interpolate",
            "sample_time",
            "shift_time",
            "time_grid",
        )
    },
    "OptimConfig": "loop",
    "apply_update": "loop",
    "train": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)

"""Data: the synthetic clip set, the encoder servers that stream it over StepRPC, the
trainer-side stream, and the motion check that scores clips.

Names load their module on first use (PEP 562): importing the package imports no torch.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "SyntheticClips": "synthetic",
    "SyntheticConfig": "synthetic",
    "eval_captions": "synthetic",
    "EncoderServers": "servers",
    "ServerConfig": "servers",
    "StepStream": "stream",
    "motion_accuracy": "motion",
    "motion_score": "motion",
    "predicted_direction": "motion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)

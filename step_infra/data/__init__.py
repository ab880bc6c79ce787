"""Data: the synthetic clip set the recipes train on, and the motion check that scores clips."""

from step_infra.data.motion import motion_accuracy, motion_score, predicted_direction
from step_infra.data.synthetic import SyntheticClips, SyntheticConfig

__all__ = [
    "SyntheticClips",
    "SyntheticConfig",
    "motion_accuracy",
    "motion_score",
    "predicted_direction",
]

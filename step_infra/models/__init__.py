"""Models: the video DiT on megatron-core, and (next) the Video-VAE and text encoders."""

from step_infra.models.config import PRESETS, DiTConfig, dit_parameter_count, get_preset
from step_infra.models.dit import DiT, build_dit
from step_infra.models.parallel import ParallelGroups

__all__ = [
    "PRESETS",
    "DiT",
    "DiTConfig",
    "ParallelGroups",
    "build_dit",
    "dit_parameter_count",
    "get_preset",
]

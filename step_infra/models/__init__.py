"""Models: the video DiT on megatron-core, the causal Video-VAE and the text encoders.

Names are imported lazily: ``step_infra.models.config`` (shapes, presets and
``dit_parameter_count``) is pure Python, so the planner can use it without importing torch
or megatron-core.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "PRESETS": "config",
    "DiTConfig": "config",
    "dit_parameter_count": "config",
    "get_preset": "config",
    "DiT": "dit",
    "build_dit": "dit",
    "ParallelGroups": "parallel",
    "VideoVAE": "vae",
    "TextEncoders": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)

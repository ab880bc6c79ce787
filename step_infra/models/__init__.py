"""Models: the video DiT on megatron-core, the causal Video-VAE and the text encoders.

Names are imported lazily: ``step_infra.models.config`` (shapes, presets and
``dit_parameter_count``) is pure Python, so the planner can use it without importing torch
or megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PRESETS": "step_infra.models.config",
    "DiTConfig": "step_infra.models.config",
    "dit_parameter_count": "step_infra.models.config",
    "get_preset": "step_infra.models.config",
    "DiT": "step_infra.models.dit",
    "build_dit": "step_infra.models.dit",
    "ParallelGroups": "step_infra.models.parallel",
    "VideoVAE": "step_infra.models.vae",
    "TextEncoders": "step_infra.models.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'step_infra.models' has no attribute {name!r}")

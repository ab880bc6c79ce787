"""Staged recipes (T2I -> T2VI -> T2V -> DPO -> average), the preference tool, averaging.

Names are imported lazily so that ``step_infra.recipes.cli`` (loaded when the ``step-infra``
command starts) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "average_checkpoints": "step_infra.recipes.averaging",
    "run_recipe": "step_infra.recipes.runner",
    **{
        name: "step_infra.recipes.stages"
        for name in (
            "RecipeConfig",
            "StageConfig",
            "TurboConfig",
            "average",
            "dpo",
            "t2i_pretrain",
            "t2v_finetune",
            "t2vi_high",
            "t2vi_low",
            "tiny_staged_recipe",
        )
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'step_infra.recipes' has no attribute {name!r}")

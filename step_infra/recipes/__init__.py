"""Staged recipes (T2I -> T2VI -> T2V -> DPO -> average), the preference tool, averaging.

Names are imported lazily so that ``step_infra.recipes.cli`` (loaded when the ``step-infra``
command starts) does not pull in torch.
"""

from __future__ import annotations

from typing import Any

from step_infra.lazy import lazy_attribute

_EXPORTS = {
    "average_checkpoints": "averaging",
    "run_recipe": "runner",
    **{
        name: "stages"
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
    return lazy_attribute(__name__, _EXPORTS, name)

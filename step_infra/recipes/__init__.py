"""Staged recipes (T2I -> T2VI -> T2V -> DPO -> average), the preference tool, averaging."""

from step_infra.recipes.averaging import average_checkpoints
from step_infra.recipes.stages import (
    RecipeConfig,
    StageConfig,
    average,
    dpo,
    t2i_pretrain,
    t2v_finetune,
    t2vi_high,
    t2vi_low,
    tiny_staged_recipe,
)

__all__ = [
    "RecipeConfig",
    "StageConfig",
    "average",
    "average_checkpoints",
    "dpo",
    "t2i_pretrain",
    "t2v_finetune",
    "t2vi_high",
    "t2vi_low",
    "tiny_staged_recipe",
]

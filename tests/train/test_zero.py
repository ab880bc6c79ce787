"""ZeRO-1 AdamW over the data-parallel group: the same steps as AdamW, half the state per
rank at dp=2, and DCP checkpoints that resume exactly, sharded or not (run under
``torchrun``; see ``step_infra.train.sharding_check`` for why the comparisons are bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from step_infra.elastic.checkpoint import state_dict
from step_infra.models.parallel import SingleRankGroup
from step_infra.train.sharding_check import launch
from step_infra.train.zero import local_optimizer, make_sharded_adamw, optimizer_state_bytes


def test_one_rank_group_is_plain_adamw_with_the_same_checkpoint_keys() -> None:
    model = nn.Linear(3, 2)
    opt = make_sharded_adamw(model.parameters(), SingleRankGroup(), lr=1e-3, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW and local_optimizer(opt) is opt
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["foreach"] is False
    keys = set(state_dict(model, opt, 0, tp_rank=0, tp_size=1))
    slots = ("step", "exp_avg", "exp_avg_sq")
    assert keys == {"meta/step"} | {
        f"{kind}/{name}"
        for name in ("weight", "bias")
        for kind in ("model", *(f"optim/{s}" for s in slots))
    }
    assert optimizer_state_bytes(opt) == 2 * 4 * (6 + 2) + 2 * 4  # m, v fp32 + two step scalars


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_sharded_adamw(
            nn.Linear(2, 2).requires_grad_(False).parameters(), SingleRankGroup(), lr=1e-3
        )
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_sharded_adamw(nn.Linear(2, 2).parameters(), SingleRankGroup(), lr=0.0)


@pytest.mark.integration
def test_zero_matches_adamw_and_resumes_exactly(tmp_path: Path) -> None:
    rc, rows, err = launch(2, "zero", "--tmp", str(tmp_path))
    assert rc == 0 and rows, err
    r = rows[0]
    assert r["ok"], r
    for step in r["steps"]:  # three steps, bitwise
        assert step["vs_replicated_adamw"] == 0.0 and step["vs_one_rank_adamw"] == 0.0
    assert r["whole_batch_grad_err"] < 1e-5
    assert 0.45 < r["state_bytes_vs_replicated"] < 0.55  # dp=2: half the state per rank
    assert r["resume_err"] == {
        "sharded_into_sharded": 0.0,
        "sharded_into_replicated": 0.0,
        "replicated_into_sharded": 0.0,
    }

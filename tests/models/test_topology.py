"""The process grid matches picotron's arange(world).view(dp, pp, cp, tp) layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_infra.emulator.plan import Plan
from step_infra.topology import ProcessGrid


def test_grid_matches_arange_view() -> None:
    grid = ProcessGrid(dp=2, pp=2, cp=2, tp=2)
    ref = torch.arange(16).view(2, 2, 2, 2)
    for rank in range(16):
        c = grid.coords(rank)
        assert int(ref[c["dp"], c["pp"], c["cp"], c["tp"]]) == rank
        assert grid.rank_of(**c) == rank
    assert grid.groups("tp")[0] == [0, 1]
    assert grid.groups("dp")[0] == [0, 8]
    assert grid.group_of("cp", 5) == [5, 7]
    assert sorted(r for g in grid.groups("pp") for r in g) == list(range(16))


def test_for_world_and_errors() -> None:
    assert ProcessGrid.for_world(8, tp=2).dp == 4
    with pytest.raises(ValueError, match="not divisible"):
        ProcessGrid.for_world(6, tp=4)
    with pytest.raises(ValueError, match="tp must be"):
        ProcessGrid(tp=0)


def test_strategy_toml(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(
        '[model]\npreset = "tiny-dit"\n[strategy]\ntp = 2\npp = 1\nvpp = 1\ncp = 1\n'
        'cp_kind = "ring"\ndp = 2\nmicro_batch = 1\nglobal_batch = 4\n'
        'sequence_parallel = true\nrecompute = "none"\ndistributed_optimizer = false\n'
        "[allocation]\nvae_gpus = 1\ntext_gpus = 1\ntrainer_gpus = 4\n[prediction]\nstep_time_s = 1.0\n"
    )
    plan = Plan.load(p)
    s = plan.strategy
    assert plan.preset == "tiny-dit" and plan.grid().shape == (2, 1, 1, 2)
    assert s.cp_kind == "ring" and s.sequence_parallel and s.global_batch == 4
    assert plan.allocation is not None and plan.allocation.trainer_gpus == 4
    p.write_text('[model]\npreset="x"\n[strategy]\ncp_kind = "star"\n')
    with pytest.raises(ValueError, match="star"):
        Plan.load(p)
    p.write_text('[model]\npreset="x"\n[strategy]\ntensor = 2\n')
    with pytest.raises(ValueError, match="unknown key 'tensor' in \\[strategy\\]"):
        Plan.load(p)
    with pytest.raises(ValueError, match="pp=2"):
        Plan.loads('[model]\npreset="x"\n[strategy]\npp = 2\n').refuse({"pp": 1}, by="t")

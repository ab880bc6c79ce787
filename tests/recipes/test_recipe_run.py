"""The staged recipe end to end: a fast smoke run of every stage, and the slow acceptance run."""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from pathlib import Path

import pytest
import torch

from step_infra.data import SyntheticConfig
from step_infra.models.text import AlibiEncoder, HashedWordEncoder, TextEncoders
from step_infra.recipes import tiny_staged_recipe
from step_infra.recipes.runner import run_recipe
from step_infra.recipes.stages import SamplingConfig, TurboConfig
from step_infra.train.loop import OptimConfig


def _smoke_recipe():  # type: ignore[no-untyped-def]
    base = tiny_staged_recipe(scale=0.03)
    stages = tuple(
        dataclasses.replace(s, dpo_prompts=8, dpo_candidates=2, dpo_sample_steps=3, batch=8)
        for s in base.stages
    )
    return dataclasses.replace(
        base,
        data=SyntheticConfig(num_clips=64, frames=9, height=16, width=16),
        stages=stages,
        sampling=SamplingConfig(steps=4, guidance=3.0),
        turbo=TurboConfig(pairs=8, teacher_steps=4, student_steps=2, optim=OptimConfig(steps=3)),
        eval_prompts=8,
    )


def test_every_stage_runs_and_writes_the_run_directory(tmp_path: Path) -> None:
    text = TextEncoders(short=HashedWordEncoder(), long=AlibiEncoder())  # no MiniLM needed here
    results = run_recipe(_smoke_recipe(), tmp_path, text=text)
    assert list(results["stages"]) == ["t2i", "t2vi-low", "t2vi-high", "t2v", "dpo", "average"]
    for key in ("before_dpo", "after_dpo", "after_average"):
        assert 0.0 <= results[key]["motion_acc"] <= 1.0
    assert set(results["turbo"]) >= {"teacher_50_steps_cfg", "student_8_steps_no_cfg"}
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["dit_preset"] == "tiny-dit" and config["stages"][4]["kind"] == "dpo"
    assert (tmp_path / "preference" / "pairs.jsonl").exists()
    assert list((tmp_path / "samples").glob("after_average-en-*.gif"))
    # The averaged model is the mean of the DPO checkpoints it names.
    avg = torch.load(tmp_path / "checkpoints" / "average.pt")
    names = results["stages"]["average"]["averaged"]
    parts = [torch.load(tmp_path / "checkpoints" / n) for n in names]
    key = "layers.0.scale_shift_table"
    torch.testing.assert_close(avg[key], sum(p[key] for p in parts) / len(parts))
    assert json.loads((tmp_path / "results.json").read_text())["recipe"] == "tiny-staged"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_staged_recipe_acceptance(tmp_path: Path) -> None:
    """Issue 8 acceptance: < 15 min on CPU, loss falls in every stage, motion check >> 25%."""
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    results = run_recipe(tiny_staged_recipe(), tmp_path)
    minutes = (time.perf_counter() - t0) / 60
    print(json.dumps(results, indent=1))
    assert minutes < 15, minutes
    assert results["vae"]["loss_last"] < results["vae"]["loss_first"]
    for name, stage in results["stages"].items():
        if "loss_first" in stage:
            assert stage["loss_last"] < stage["loss_first"], (name, stage)
    for key in ("before_dpo", "after_dpo", "after_average"):
        assert results[key]["motion_acc"] >= 0.5, (key, results[key])
